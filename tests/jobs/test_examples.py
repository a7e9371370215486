"""Every shipped example spec parses and passes the checks made before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.launch import validate_train_spec
from jobs.loader import load_spec
from jobs.spec import TrainSpec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "jobs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    spec = validate_train_spec(load_spec(TrainSpec, path), str(path))
    assert spec.name == path.stem


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"code-lm-tiny.yaml", "llama-7b-zero3.yaml"}


def test_large_example_is_the_size_it_claims():
    from transformers import AutoConfig

    spec = load_spec(TrainSpec, EXAMPLES[[p.name for p in EXAMPLES].index("llama-7b-zero3.yaml")])
    config = AutoConfig.for_model(spec.model.arch, vocab_size=32000, **spec.model.config)
    h, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    params = 2 * 32000 * h + layers * (4 * h * h + 3 * h * ffn)
    assert 6.5e9 < params < 7.0e9
