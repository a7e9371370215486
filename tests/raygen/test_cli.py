"""The console script: bad input is a short message with exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, raygen

EXAMPLE = ROOT / "jobs" / "examples" / "code-lm-tiny.yaml"


def test_bad_spec_exits_2_with_every_problem_and_no_traceback(tmp_path):
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["deepspeed"]["zero_stage"] = 5
    spec["modle"] = spec.pop("model")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = raygen("train", str(path), "--set", "train.precison=bf16")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "did you mean `precision`?" in done.stderr
    assert "`modle`: unknown key; did you mean `model`?" in done.stderr
    assert "`deepspeed.zero_stage`: got 5" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_environment_problems_exit_2_before_ray_starts(tmp_path):
    done = raygen(
        "train",
        str(EXAMPLE),
        "--set",
        "train.precision=fp16",
        "--set",
        f"data.train={tmp_path / 'nothing.parquet'}",
    )
    assert done.returncode == 2, done.stderr
    assert "fp16 needs GPUs" in done.stderr
    assert "nothing.parquet does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_spec_file():
    done = raygen("train", "no/such/spec.yaml")
    assert done.returncode == 2
    assert "no/such/spec.yaml: file not found" in done.stderr


@pytest.mark.integration
def test_check_prints_the_resolved_spec():
    done = raygen("train", str(EXAMPLE), "--check", "--set", "train.max_steps=70")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["train"]["max_steps"] == 70
    assert resolved["run"]["storage"] == str(ROOT / "runs")


SCHEMA_EXAMPLES = {
    "train": sorted((ROOT / "jobs" / "examples").glob("*.yaml")),
    "sweep": sorted((ROOT / "tuning" / "examples").glob("*.yaml")),
    "audit": sorted((ROOT / "serving" / "examples").glob("*-audit.yaml")),
    "deploy": [ROOT / "serving" / "examples" / f for f in ("code-lm.yaml", "digits.yaml")],
}


def test_schema_prints_each_specs_json_schema_and_the_shipped_copies_are_current():
    """`raygen schema KIND` is what docs/schemas/ holds (regenerate it with `make schemas`),
    and every example spec names that file for editors and validates against it."""
    import jsonschema

    for kind, examples in SCHEMA_EXAMPLES.items():
        done = raygen("schema", kind)
        assert done.returncode == 0, done.stderr
        schema = json.loads(done.stdout)
        assert schema["title"] == f"raygen {kind} spec"
        assert schema["additionalProperties"] is False
        shipped = ROOT / "docs" / "schemas" / f"{kind}.schema.json"
        assert json.loads(shipped.read_text()) == schema, f"run `make schemas`: {shipped}"
        assert examples
        for example in examples:
            first = example.read_text().splitlines()[0]
            assert first == f"# yaml-language-server: $schema=../../docs/schemas/{kind}.schema.json"
            jsonschema.validate(yaml.safe_load(example.read_text()), schema)
    typo = yaml.safe_load(EXAMPLE.read_text())
    typo["train"]["max_step"] = 10
    schema = json.loads(raygen("schema", "train").stdout)
    try:
        jsonschema.validate(typo, schema)
        raise AssertionError("a misspelled key passed the schema")
    except jsonschema.ValidationError as exc:
        assert "max_step" in str(exc)
    assert json.loads(raygen("train", "--print-schema").stdout)["title"] == "TrainSpec"
    nope = raygen("schema", "nope")
    assert nope.returncode == 2 and "'nope' is not one of 'train'" in nope.stderr


def test_version_help_and_choices():
    """--version; a group without a command shows its help; choices are listed in --help."""
    from raygen import __version__

    assert raygen("--version").stdout.strip() == f"raygen {__version__}"
    for group in ("jobs", "cluster", "data", "serve"):
        done = raygen(group)
        assert f" {group} [OPTIONS] COMMAND [ARGS]" in done.stdout + done.stderr
        assert "Commands" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert "<train|tune|audit|serve>" in raygen("submit", "--help").stdout
    assert "ddpm|ddim" in raygen("sample", "--help").stdout
    bad = raygen("submit", "trian", str(EXAMPLE))
    assert bad.returncode == 2 and "'trian' is not one of" in bad.stderr


@pytest.mark.integration
def test_unreachable_address_fails_fast_with_a_clear_error(tmp_path: Path):
    done = raygen(
        "train", str(EXAMPLE), "--address", "127.0.0.1:1", "--set", f"run.storage={tmp_path}"
    )
    assert done.returncode == 2
    assert "Cannot reach a Ray cluster at 127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_more_workers_than_the_local_ray_has(tmp_path):
    done = raygen(
        "train",
        str(EXAMPLE),
        "--set",
        "scaling.num_workers=64",
        "--set",
        f"run.storage={tmp_path}",
    )
    assert done.returncode == 2, done.stderr
    assert "64 workers x 1 CPU = 64 CPU, but the cluster has" in done.stderr
    assert not (tmp_path / "code-lm-tiny").exists()


@pytest.mark.integration
def test_data_prepare_writes_shards_and_stats(tmp_path):
    from tests.conftest import tiny_lm_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_lm_spec(tmp_path)))
    done = raygen("data", "prepare", str(path))
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "runs" / "tiny" / "data" / "data_stats.json").read_text())
    assert json.loads(done.stdout) == stats
    assert stats["train_sequences"] > 0 and stats["train_tokens"] == 64 * stats["train_sequences"]
    assert stats["rows_out"] == stats["train_documents"] + stats["eval_documents"]
    # Not a terminal: each stage's progress as plain lines.
    read, train = stats["rows_in"], stats["train_documents"]
    assert f"read and clean documents: {read:,}/{read:,} done in" in done.stderr
    assert f"tokenize train documents: {train:,}/{train:,} done in" in done.stderr
    again = raygen("data", "prepare", str(path))
    assert "is up to date" in again.stderr


def test_serve_input_errors_exit_2_before_ray_starts(tmp_path):
    spec = tmp_path / "deploy.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "model": str(tmp_path / "nope")}))
    done = raygen("serve", str(spec))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "does not exist; give an exported model directory" in done.stderr
    detached = raygen("serve", str(spec), "--detach")
    assert detached.returncode == 2
    assert "--detach needs a running Ray cluster" in detached.stderr
    typo = raygen("serve", str(spec), "--set", "autoscaling.max_replica=3")
    assert typo.returncode == 2 and "did you mean `max_replicas`?" in typo.stderr
    nowhere = raygen("serve", "status", "--address", "127.0.0.1:1")
    assert nowhere.returncode == 2 and "Cannot reach a Ray cluster at 127.0.0.1:1" in nowhere.stderr
