"""The train spec and its loader: defaults < YAML < --set, and errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raygen.jobs.errors import SpecError
from raygen.jobs.loader import load_spec, validate_spec
from raygen.jobs.spec import TrainSpec, global_batch_size

MINIMAL = {"name": "x", "model": {"arch": "gpt2"}, "data": {"train": "builtin:python-stdlib"}}


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems(raw: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(TrainSpec, raw, "spec.yaml", overrides)
    return info.value.problems


def test_defaults_fill_every_section():
    spec = validate_spec(TrainSpec, MINIMAL, "spec.yaml")
    assert spec.deepspeed.zero_stage == 2
    assert spec.data.train == ["builtin:python-stdlib"]
    assert spec.run.storage == "runs"
    assert global_batch_size(spec) == 8 * 1 * 2


def test_set_overrides_win_over_yaml_and_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"max_steps": 10, "lr": 0.1}})
    spec = load_spec(
        TrainSpec, path, ["train.max_steps=500", "train.precision=bf16", "model.config.n_layer=3"]
    )
    assert spec.train.max_steps == 500
    assert spec.train.lr == 0.1
    assert spec.train.precision == "bf16"
    assert spec.model.config == {"n_layer": 3}


def test_unknown_key_suggests_the_closest_valid_one():
    found = problems({**MINIMAL, "trian": {}, "deepspeed": {"zero_stag": 2}})
    assert "`trian`: unknown key; did you mean `train`?" in found
    assert "`deepspeed.zero_stag`: unknown key; did you mean `zero_stage`?" in found


def test_every_problem_is_reported_at_once_with_its_path_and_value():
    found = problems(
        {**MINIMAL, "deepspeed": {"zero_stage": 5}, "train": {"precision": "fp8", "lr": -1}},
        ["scaling.num_workers=0"],
    )
    text = "\n".join(found)
    assert len(found) == 4
    assert "`deepspeed.zero_stage`: got 5; input should be 0, 1, 2 or 3." in text
    assert "`train.precision`: got 'fp8'" in text
    assert "`train.lr`: got -1" in text
    assert "`scaling.num_workers`: got 0" in text


def test_set_for_a_key_that_does_not_exist_is_an_error():
    found = problems(MINIMAL, ["train.max_step=5", "deepspeed.zero_stage.x=1", "bad"])
    assert (
        found[0] == "--set train.max_step: unknown key `train.max_step`; did you mean `max_steps`?"
    )
    assert "`deepspeed.zero_stage` is a value, not a section" in found[1]
    assert "expected key.path=value" in found[2]


def test_free_form_sections_accept_any_key_and_reach_the_deepspeed_config():
    from raygen.jobs.train.deepspeed_config import derive_deepspeed_config

    spec = validate_spec(
        TrainSpec, MINIMAL, "s", ["deepspeed.overrides.zero_optimization.reduce_bucket_size=5e7"]
    )
    config = derive_deepspeed_config(spec, 2, 1_000_000)
    assert config["zero_optimization"]["reduce_bucket_size"] == 5e7  # deep-merged, wins
    assert config["zero_optimization"]["stage"] == spec.deepspeed.zero_stage  # kept


def test_model_needs_exactly_one_of_arch_and_pretrained():
    found = problems({**MINIMAL, "model": {}})
    assert found == [
        "`model`: set exactly one of `model.arch` (train from scratch) and `model.pretrained` "
        "(fine-tune a saved model)."
    ]


def test_missing_required_keys_and_bad_names():
    found = problems({"name": "has space", "model": {"arch": "gpt2"}})
    assert any(p.startswith("`name`: got 'has space'") for p in found)
    assert "`data`: missing; this key is required." in found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed", "is not valid YAML at line 1"),
        ("- a\n- b\n", "must be a mapping of keys to values, not a list"),
    ],
)
def test_file_level_errors(tmp_path, text, expected):
    with pytest.raises(SpecError, match=expected):
        load_spec(TrainSpec, write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(TrainSpec, tmp_path / "nope.yaml")


def test_spec_error_pickles_for_ray():
    import pickle

    err = SpecError("s.yaml", ["a", "b"])
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == ["a", "b"] and str(again) == str(err)


def test_json_schema_documents_every_field():
    schema = TrainSpec.model_json_schema()
    for name, section in schema["$defs"].items():
        for field, info in section.get("properties", {}).items():
            assert info.get("description"), f"{name}.{field} has no description"
