"""The sweep spec: a base train spec, the keys to search, the metric and the scheduler.

Cheap to import (pydantic only), like the train spec.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raygen.jobs.spec import Section, TrackingSpec

DOMAIN_KINDS = ("choice", "uniform", "loguniform", "randint", "grid")


class Domain(Section):
    """Where one spec key's values come from: exactly one of the kinds."""

    choice: list[Any] | None = Field(None, description="Sample uniformly from these values.")
    uniform: tuple[float, float] | None = Field(None, description="Uniform float in [a, b].")
    loguniform: tuple[float, float] | None = Field(
        None, description="Log-uniform float in [a, b] (both > 0): for learning rates."
    )
    randint: tuple[int, int] | None = Field(None, description="Integer in [a, b) (b excluded).")
    grid: list[Any] | None = Field(
        None, description="Every value, each combined with every other grid key's values."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(DOMAIN_KINDS)} (got "
                f"{', '.join(given) or 'none'}), e.g. {{loguniform: [1.0e-4, 1.0e-2]}}"
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"`{kind}` needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"`{kind}`: the lower bound must be below the upper, got {value}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"`loguniform`: bounds must be > 0, got {value}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAIN_KINDS if getattr(self, k) is not None)

    def values_to_check(self) -> list[Any]:
        """Representative values to validate against the train spec (bounds, every choice)."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return list(value)


class SchedulerSpec(Section):
    type: Literal["asha", "successive_halving", "median", "pbt", "fifo"] = Field(
        "asha",
        description="Early stopping: `asha` (asynchronous successive halving: a trial goes "
        "on if it is in the best 1/reduction_factor of those that reached its rung so far), "
        "`successive_halving` (synchronous: trials pause at each rung until all have "
        "reached it, then only the best 1/reduction_factor go on; fewer trial-steps than "
        "asha with few trials, one restart per rung), `median` (stop trials below the "
        "median), `pbt` (population based training: bad trials copy a good trial's "
        "checkpoint and perturb its searched values), `fifo` (none).",
    )
    grace_period: int = Field(
        1,
        ge=1,
        description="asha/successive_halving/median: evaluations a trial always gets before "
        "it may stop (the first rung).",
    )
    reduction_factor: float = Field(
        2,
        gt=1,
        description="asha/successive_halving: keep 1/reduction_factor of the trials at each "
        "rung; rungs are at grace_period x reduction_factor^k evaluations.",
    )
    max_t: int | None = Field(
        None,
        ge=1,
        description="asha: evaluations of the longest trial; successive_halving: rungs lie "
        "below it (the last survivors run to the end). Default: the base spec's max_steps / "
        "eval_every.",
    )
    perturbation_interval: int = Field(
        1, ge=1, description="pbt: evaluations between exploit/explore decisions."
    )
    quantile_fraction: float = Field(
        0.25,
        gt=0,
        le=0.5,
        description="pbt: the bottom fraction copies from the top fraction.",
    )
    resample_probability: float = Field(
        0.25,
        ge=0,
        le=1,
        description="pbt: chance a perturbed value is drawn anew from its domain.",
    )
    synch: bool = Field(
        True,
        description="pbt: trials wait for each other at every perturbation (generations), "
        "so trials that run one after another on a small cluster are still compared.",
    )


class SweepRunSpec(Section):
    storage: str = Field(
        "runs",
        description="Directory or bucket URI (s3://, gs://, abfs://); the sweep is "
        "<storage>/<name>.",
    )
    max_failures: int = Field(
        0, ge=0, description="Retries of an errored trial (each retry resumes its checkpoint)."
    )
    pending_timeout_s: float = Field(
        1800,
        gt=0,
        description="A trial whose workers wait this long for resources stops the sweep with "
        "an error naming them (after a warning at a minute). Long enough for an autoscaler "
        "to add nodes.",
    )


class SweepSpec(Section):
    """A hyperparameter sweep: trials are raygen training runs of `base` with searched keys."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        max_length=128,
        description="Sweep name; it lives in `<run.storage>/<name>`.",
    )
    base: str = Field(description="Train spec (YAML) of every trial, relative to this file.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted train-spec keys set in every trial, e.g. {train.max_steps: 200}.",
    )
    search: dict[str, Domain] = Field(
        description="Dotted train-spec keys to search, each with a domain, e.g. "
        "{train.lr: {loguniform: [1.0e-4, 1.0e-2]}}."
    )
    metric: str = Field(
        "eval_loss", description="The metric to optimize, as logged at eval steps (e.g. fid)."
    )
    mode: Literal["min", "max"] = Field("min", description="Minimize or maximize the metric.")
    num_samples: int = Field(
        1, ge=1, description="Trials drawn (times the number of grid combinations)."
    )
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="Trials at once. Default: as many as the cluster's CPUs/GPUs fit, given "
        "each trial's scaling.",
    )
    search_alg: Literal["random"] = Field(
        "random", description="How values are drawn: `random` (and every grid combination)."
    )
    seed: int = Field(0, ge=0, description="Seed of the search: the same seed, the same trials.")
    scheduler: SchedulerSpec = Field(
        default_factory=SchedulerSpec, description="Early stopping / population based training."
    )
    run: SweepRunSpec = Field(default_factory=SweepRunSpec, description="Storage and retries.")
    tracking: TrackingSpec | None = Field(
        None,
        description="Experiment tracking of the sweep (a parent MLflow run) and its trials "
        "(a child run each). Default: the base spec's; its embedded store goes under this "
        "sweep's run.storage.",
    )

    def trials(self) -> int:
        """Trials the sweep runs: num_samples x every combination of the grid keys."""
        combinations = math.prod(len(d.grid) for d in self.search.values() if d.kind == "grid")
        return self.num_samples * combinations

    @field_validator("search")
    @classmethod
    def _not_empty(cls, value: dict[str, Domain]) -> dict[str, Domain]:
        if not value:
            raise ValueError("name at least one train-spec key to search")
        return value


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Evaluations at which trials are compared: grace x factor**k, below max_t."""
    out, t = [], float(grace_period)
    while t < max_t:
        out.append(math.ceil(t))
        t *= reduction_factor
    return sorted(set(out))
