"""Sweep specs: search-space parsing and every error named before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raygen.jobs.errors import SpecError
from raygen.tuning.spec import SweepSpec
from raygen.tuning.validate import load_sweep, sweep_problems

ROOT = Path(__file__).resolve().parents[2]


def write_sweep(tmp_path: Path, **fields) -> Path:
    sweep = {
        "name": "s",
        "base": str(ROOT / "jobs" / "examples" / "code-lm-tiny.yaml"),
        "search": {"train.lr": {"loguniform": [1e-4, 1e-2]}},
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_every_domain_kind_parses():
    spec = SweepSpec.model_validate(
        {
            "name": "s",
            "base": "b.yaml",
            "search": {
                "a": {"choice": [1, 2]},
                "b": {"uniform": [0, 1]},
                "c": {"loguniform": [1e-4, 1e-2]},
                "d": {"randint": [1, 5]},
                "e": {"grid": ["x", "y"]},
            },
        }
    )
    assert [d.kind for d in spec.search.values()] == [
        "choice", "uniform", "loguniform", "randint", "grid"
    ]  # fmt: skip
    assert spec.search["d"].values_to_check() == [1, 4]


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ({}, "give exactly one of choice, uniform, loguniform, randint, grid (got none)"),
        ({"choice": [1], "grid": [2]}, "(got choice, grid)"),
        ({"uniform": [2, 1]}, "the lower bound must be below the upper"),
        ({"loguniform": [0, 1]}, "bounds must be > 0"),
        ({"normal": [0, 1]}, "unknown key; did you mean `uniform`?"),
    ],
)
def test_bad_domains_are_named(tmp_path, domain, message):
    path = write_sweep(tmp_path, search={"train.lr": domain})
    with pytest.raises(SpecError, match="search.train.lr") as info:
        load_sweep(path)
    assert message in str(info.value)


def test_unknown_and_fixed_keys_are_errors_before_anything_runs(tmp_path):
    path = write_sweep(
        tmp_path,
        search={
            "train.lrr": {"choice": [1e-3]},
            "scaling.num_workers": {"choice": [1, 2]},
            "data.seq_len": {"choice": [32, 64]},
        },
        overrides={"train.max_stepz": 10},
    )
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    message = str(info.value)
    assert (
        "`search.train.lrr`: not a train-spec key: unknown key `train.lrr`; did you mean `lr`?"
        in message
    )
    assert "`overrides.train.max_stepz`: not a train-spec key" in message
    assert "`search.scaling.num_workers`: cannot be searched" in message
    assert "`search.data.seq_len`: cannot be searched" in message


def test_each_searched_value_is_validated_against_the_train_spec(tmp_path):
    path = write_sweep(
        tmp_path,
        search={"deepspeed.zero_stage": {"choice": [2, 5]}, "train.lr": {"uniform": [0.5, 2]}},
    )
    sweep, base = load_sweep(path)
    problems = "\n".join(sweep_problems(sweep, base, str(path)))
    assert "`search.deepspeed.zero_stage` = 5: `deepspeed.zero_stage`: got 5" in problems
    assert "`search.train.lr` = 2.0: `train.lr`: got 2.0" in problems


def test_metric_must_be_logged_by_the_family(tmp_path):
    sweep, base = load_sweep(write_sweep(tmp_path, metric="fid"))
    problems = sweep_problems(sweep, base, "s")
    assert any(
        "`metric`: 'fid' is not logged at eval steps of a causal-lm run" in p for p in problems
    )
    # Every family has its metrics: a GAN sweep of its learning rate on its FID.
    from tests.conftest import tiny_gan_spec

    sweep.metric = "eval_loss"
    gan = tiny_gan_spec(tmp_path)
    problems = sweep_problems(sweep, gan, "s")
    assert any("'eval_loss' is not logged at eval steps of a gan run; use one of fid" in p
               for p in problems)  # fmt: skip


def test_base_path_is_relative_to_the_sweep_file(tmp_path):
    path = write_sweep(tmp_path, base="nope.yaml")
    with pytest.raises(SpecError, match="`base`: .*nope.yaml does not exist"):
        load_sweep(path)


def test_shipped_sweep_examples_validate():
    for path in sorted((ROOT / "tuning" / "examples").glob("*.yaml")):
        sweep, base = load_sweep(path)
        assert sweep_problems(sweep, base, str(path)) == [], path.name


def test_rerunning_a_sweep_without_resume_is_an_error_that_says_what_to_do(tmp_path):
    from raygen.tuning.sweep import run_sweep

    path = write_sweep(tmp_path, run={"storage": str(tmp_path / "sweeps")})
    (tmp_path / "sweeps" / "s").mkdir(parents=True)
    (tmp_path / "sweeps" / "s" / "tuner.pkl").write_bytes(b"")
    sweep, base = load_sweep(path)
    with pytest.raises(SpecError, match="already ran .* continue it with --resume"):
        run_sweep(sweep, base, str(path))
    with pytest.raises(SpecError, match="--resume: no sweep to continue"):
        run_sweep(sweep.model_copy(update={"name": "other"}), base, str(path), resume=True)


def test_successive_halving_without_a_rung_is_an_error(tmp_path):
    """The base trains 300 steps with an evaluation every 100: 3 evaluations in all."""
    scheduler = {"type": "successive_halving", "grace_period": 3}
    sweep, base = load_sweep(write_sweep(tmp_path, scheduler=scheduler))
    problems = sweep_problems(sweep, base, "s")
    assert any(
        "`scheduler.grace_period`: 3 evaluations leave no rung below the trial's 3" in p
        for p in problems
    ), problems
    scheduler["grace_period"] = 2
    assert sweep_problems(*load_sweep(write_sweep(tmp_path, scheduler=scheduler)), "s") == []
