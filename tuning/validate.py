"""A sweep spec read and checked against its base train spec before anything runs: every
problem at once (searched keys that do not exist or would change the data, metrics the
family does not log, schedulers that cannot decide)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from raygen.jobs.errors import SpecError
from raygen.jobs.loader import check_key_path, load_spec, validate_spec
from raygen.jobs.spec import TrainSpec
from raygen.tuning.spec import SweepSpec, rungs

# Keys a sweep may not search: where and how big a trial runs, and the data, which is
# prepared and read once for all trials.
FIXED_KEYS = ("name", "run", "scaling", "data", "tokenizer")


# Metrics each model family logs at every evaluation.
EVAL_METRICS = {
    "causal-lm": ("eval_loss", "perplexity"),
    "diffusion": ("eval_loss", "fid"),
    "vae": ("eval_loss", "reconstruction_error", "psnr", "kl"),
    "gan": ("fid", "is_mean"),
}


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, dict]:
    """The sweep spec and its base train spec (as a raw dict with the sweep's overrides).

    Raises:
        SpecError: either file is missing or invalid, or a key is not a train-spec key.
    """
    sweep = load_spec(SweepSpec, path, overrides)
    base_path = Path(path).parent / sweep.base
    source = str(path)
    if not base_path.is_file():
        raise SpecError(source, f"`base`: {base_path} does not exist; give a train spec path.")
    base_raw = yaml.safe_load(base_path.read_text()) or {}
    problems = []
    for section, keys in (("overrides", sweep.overrides), ("search", sweep.search)):
        for key in keys:
            problem = check_key_path(TrainSpec, key.split("."))
            if problem:
                problems.append(f"`{section}.{key}`: not a train-spec key: {problem}")
            elif section == "search" and any(
                key == fixed or key.startswith(fixed + ".") for fixed in FIXED_KEYS
            ):
                problems.append(
                    f"`search.{key}`: cannot be searched: every trial shares the sections "
                    f"{', '.join(FIXED_KEYS)} (the data is prepared and read once for all "
                    "trials); set it in the base spec or overrides."
                )
    if problems:
        raise SpecError(source, problems)
    for key, value in sweep.overrides.items():
        set_key(base_raw, key, value)
    return sweep, base_raw


def sweep_problems(sweep: SweepSpec, base_raw: dict, source: str) -> list[str]:
    """Everything wrong with a sweep found without Ray: each searched value is tried."""
    from raygen.jobs.validate import resolve_paths, spec_problems

    problems = []
    for key, domain in sweep.search.items():
        for value in domain.values_to_check():
            raw = copy.deepcopy(base_raw)
            set_key(raw, key, value)
            try:
                validate_spec(TrainSpec, raw, source)
            except SpecError as exc:
                problems += [f"`search.{key}` = {value!r}: {p}" for p in exc.problems]
    if problems:
        return problems
    trial = copy.deepcopy(base_raw)
    for key, domain in sweep.search.items():
        set_key(trial, key, domain.values_to_check()[0])
    try:
        spec = resolve_paths(validate_spec(TrainSpec, trial, source))
    except SpecError as exc:
        return exc.problems
    problems += spec_problems(spec)
    known = EVAL_METRICS[spec.model.family]
    if sweep.metric not in known:
        problems.append(
            f"`metric`: {sweep.metric!r} is not logged at eval steps of a "
            f"{spec.model.family} run; use one of {', '.join(known)}."
        )
    s = sweep.scheduler
    if s.type == "successive_halving" and not milestones(s, spec):
        problems.append(
            f"`scheduler.grace_period`: {s.grace_period} evaluations leave no rung below the "
            f"trial's {s.max_t or evaluations_of(spec)} (max_t, or max_steps / eval_every): "
            "successive halving would stop nothing; lower grace_period or use fifo."
        )
    if sweep.metric == "fid" and spec.sampling.fid_extractor == "none":
        problems.append("`metric`: fid needs sampling.fid_extractor (classifier or inception).")
    return problems


def evaluations_of(spec: TrainSpec) -> int:
    """Evaluations (Tune reports) in a full trial: every eval_every steps and the last."""
    return math.ceil(spec.train.max_steps / spec.train.eval_every)


def milestones(s: Any, base: TrainSpec) -> list[int]:
    return rungs(s.grace_period, s.reduction_factor, s.max_t or evaluations_of(base))
