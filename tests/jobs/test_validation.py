"""Checks made before Ray is asked for anything: inputs, architectures, precision, ZeRO."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raygen.jobs.errors import SpecError
from raygen.jobs.loader import validate_spec
from raygen.jobs.spec import TrainSpec
from raygen.jobs.validate import validate_train_spec

ROOT = Path(__file__).resolve().parents[2]


def check(raw_overrides: list[str], **sections) -> list[str]:
    raw = {"name": "x", "model": {"arch": "gpt2"}, "data": {"train": "builtin:python-stdlib"}}
    raw.update(sections)
    spec = validate_spec(TrainSpec, raw, "s", raw_overrides)
    with pytest.raises(SpecError) as info:
        validate_train_spec(spec, "s")
    return info.value.problems


def test_valid_spec_passes_and_paths_become_absolute():
    raw = {"name": "x", "model": {"arch": "gpt2"}, "data": {"train": "builtin:python-stdlib"}}
    spec = validate_train_spec(validate_spec(TrainSpec, raw, "s"), "s")
    assert spec.run.storage.startswith("/")


def test_fp16_on_cpu_offload_without_zero3_and_unknown_arch():
    found = check(
        ["train.precision=fp16", "deepspeed.offload_params=cpu", "model.arch=gtp2"],
    )
    text = "\n".join(found)
    assert "`train.precision`: fp16 needs GPUs" in text
    assert "`deepspeed.offload_params`: parameter offload needs zero_stage: 3" in text
    assert "`model.arch`: transformers has no architecture 'gtp2'. Did you mean gpt2" in text


def test_unknown_config_parameter_of_the_architecture():
    found = check(["model.config.n_layers=2"])
    assert found == [
        "`model.config.n_layers`: not a parameter of GPT2Config; did you mean `n_layer`?"
    ]


def test_missing_data_path_and_wrong_column(tmp_path):
    table = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), table)
    found = check([], data={"train": [str(tmp_path / "missing"), str(table)]})
    assert any("missing does not exist" in p for p in found)
    found = check([], data={"train": str(table)})
    assert "has no column 'text'; its columns are content" in found[0]


def test_pretrained_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    found = check([], model={"pretrained": str(tmp_path)})
    assert found == [
        f"`model.pretrained`: {tmp_path} has no safetensors weights (model.safetensors or "
        "model.safetensors.index.json); save the model with safe_serialization."
    ]


def test_unknown_builtin_corpus():
    found = check([], data={"train": "builtin:wikipedia"})
    assert "unknown builtin data set 'builtin:wikipedia'; known: builtin:python-stdlib" in found[0]


def test_group_weighting_needs_parquet_with_the_group_column(tmp_path):
    weighting = {"group_weighting": {"column": "dialect", "method": "inverse_frequency"}}
    found = check([], train=weighting)
    assert found == [
        "`train.group_weighting`: builtin:python-stdlib has no group column; group weighting "
        "needs Parquet data with a column naming each document's group."
    ]
    table = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "lang": ["x", "y"]}), table)
    found = check([], data={"train": str(table)}, train=weighting)
    assert len(found) == 1
    assert "has no column 'dialect'; its columns are text, lang" in found[0]
    assert "Set `train.group_weighting.column`" in found[0]


def test_group_weighting_method_is_named_and_diffusion_has_none():
    raw = {"name": "x", "model": {"arch": "gpt2"}, "data": {"train": "builtin:python-stdlib"}}
    with pytest.raises(SpecError) as info:
        validate_spec(TrainSpec, raw, "s", ["train.group_weighting.column=dialect"])
    assert info.value.problems == ["`train.group_weighting.method`: missing; this key is required."]
    found = check(
        ["train.group_weighting.column=dialect", "train.group_weighting.method=worst_group"],
        model={"family": "diffusion", "arch": "unet2d", "config": {"sample_size": 8}},
        data={"train": "builtin:digits"},
    )
    assert any(
        p.startswith("`train.group_weighting`: group weighting is for language") for p in found
    )


@pytest.mark.parametrize("example", ["code-lm-tiny", "llama-7b-zero3", "digits-ddpm", "digits-vae"])
def test_check_answers_without_torch_once_the_models_config_keys_are_known(example, tmp_path):
    """The first `--check` of an architecture imports its library (transformers, diffusers:
    they load torch) and keeps what their config classes accept, per library version; a
    second answers without torch (Llama's legacy `rope_theta` included), and a misspelled
    key still goes to the library and is named."""
    env = {**os.environ, "RAYGEN_CACHE": str(tmp_path)}
    spec = ROOT / "jobs" / "examples" / f"{example}.yaml"

    def check(*extra: str) -> tuple[subprocess.CompletedProcess, bool]:
        command = [sys.executable, "-X", "importtime", "-m", "raygen", "train", str(spec)]
        done = subprocess.run(
            [*command, "--check", *extra], env=env, capture_output=True, text=True
        )
        imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
        return done, "torch" in imported

    first, imported = check()
    assert first.returncode == 0, first.stderr[-2000:]
    assert imported and list(tmp_path.glob("library-facts/*.json"))
    second, imported = check()
    assert second.returncode == 0 and not imported, second.stderr[-2000:]
    if example == "code-lm-tiny":
        typo, imported = check("--set", "model.config.n_layr=2")
        assert typo.returncode != 0 and imported
        assert "`model.config.n_layr`: not a parameter of GPT2Config" in typo.stderr
