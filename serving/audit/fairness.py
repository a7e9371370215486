"""The audit's figures: per-group metrics with Fairlearn, compared with thresholds.

Pure (numpy, pandas, Fairlearn): the audit job computes each row's loss, completion score
or generated image's class, and these functions turn them into a check result.

Every figure comes with a bootstrap confidence interval (Fairlearn's `MetricFrame`
resamples the rows `n_boot` times, seeded). The decision `point` judges the point
estimates; `conservative` fails a check whenever the interval of a judged figure reaches
past its threshold, so a pass means the evidence, not only the sample, clears it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

INTERSECTION = " & "  # joins feature names, and each row's groups, of an intersection


@dataclass(frozen=True)
class Evidence:
    """How much evidence a check needs, and how it is weighed."""

    min_group_size: int = 30  # smaller groups fail as insufficient evidence
    n_boot: int = 200  # bootstrap resamples for the intervals; 0: none
    confidence: float = 0.95  # the intervals' coverage
    seed: int = 0  # the bootstrap's random state
    decision: str = "point"  # `point` or `conservative`


@dataclass
class CheckResult:
    """One check on one sensitive feature (or an intersection), as written to audit.json."""

    metric: str
    feature: str
    by_group: dict[str, float]
    counts: dict[str, int]
    overall: float
    ratio: float  # worst group / best group (<= 1 for rates, >= 1 for losses)
    difference: float  # |best - worst|
    thresholds: dict[str, float]
    passed: bool
    reasons: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    # {"confidence", "n_boot", "by_group": {group: [low, high]}, "overall", "ratio",
    #  "difference": [low, high]}; empty without bootstrap.
    intervals: dict[str, Any] = field(default_factory=dict)
    decision: str = "point"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def group_labels(columns: list[np.ndarray]) -> np.ndarray:
    """Each row's group: its value of one feature, or its values of several joined (the
    intersection's cell)."""
    parts = [np.asarray([str(v) for v in column], dtype=object) for column in columns]
    if len(parts) == 1:
        return parts[0]
    return np.asarray([INTERSECTION.join(values) for values in zip(*parts, strict=True)])


def quality_of_service(
    row_losses: np.ndarray,
    groups: np.ndarray,
    metric: str,
    feature: str,
    evidence: Evidence,
    max_ratio: float | None,
    max_difference: float | None,
) -> CheckResult:
    """Per-group mean token loss, or perplexity = exp(mean token loss); lower is better.

    Args:
        row_losses: each row's mean token loss (nats).
        groups: each row's group in `feature` (see `group_labels`).
        metric: `token_loss` or `perplexity`.
    """

    def value(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        mean = float(np.mean(y_pred))
        return math.exp(mean) if metric == "perplexity" else mean

    losses = np.asarray(row_losses, dtype=float)
    frame = _frame(value, losses, losses, groups, evidence)
    by_group = _by_group(frame)
    best, worst = min(by_group.values()), max(by_group.values())
    ratio = worst / best if best > 0 else math.inf
    intervals = _intervals(frame, evidence, invert_ratio=True)
    judge = _Judge(evidence, intervals)
    low, high = _argmin(by_group), _argmax(by_group)
    judge.at_most(
        "ratio",
        ratio,
        max_ratio,
        "max_ratio",
        f"{metric} of the worst group ({high}: {worst:.4g}) is {ratio:.3f}x the best ({low}: "
        f"{best:.4g})",
    )
    judge.at_most(
        "difference",
        worst - best,
        max_difference,
        "max_difference",
        f"{metric} differs by {worst - best:.4g} between groups {high} and {low}",
    )
    return _finish(
        metric, feature, by_group, groups, frame, ratio, worst - best, judge, evidence, intervals
    )


def outcome_disparity(
    scores: np.ndarray,
    groups: np.ndarray,
    feature: str,
    evidence: Evidence,
    min_ratio: float | None,
    max_difference: float | None,
    labels: np.ndarray | None = None,
    max_equalized_odds_difference: float | None = None,
) -> CheckResult:
    """Selection rate (share of 1s) per group; demographic parity ratio and difference, and
    with labels the equalized odds difference (a point estimate)."""
    from fairlearn.metrics import equalized_odds_difference, selection_rate

    y_pred = np.asarray(scores, dtype=int)
    y_true = np.asarray(labels, dtype=int) if labels is not None else y_pred
    frame = _frame(selection_rate, y_true, y_pred, groups, evidence)
    by_group = _by_group(frame)
    top = max(by_group.values())
    # Every group at rate 0 is parity (Fairlearn's 0/0 would be NaN).
    ratio = min(by_group.values()) / top if top > 0 else 1.0
    difference = top - min(by_group.values())
    intervals = _intervals(frame, evidence, invert_ratio=False)
    judge = _Judge(evidence, intervals)
    low, high = _argmin(by_group), _argmax(by_group)
    judge.at_least(
        "ratio",
        ratio,
        min_ratio,
        "min_ratio",
        f"positive rate of {low} ({by_group[low]:.3f}) is {ratio:.3f} of {high}'s "
        f"({by_group[high]:.3f})",
    )
    judge.at_most(
        "difference",
        difference,
        max_difference,
        "max_difference",
        f"positive rates of {high} and {low} differ by {difference:.3f}",
    )
    extra = {}
    if labels is not None:
        eod = float(equalized_odds_difference(y_true, y_pred, sensitive_features=groups))
        extra["equalized_odds_difference"] = eod
        judge.at_most(
            None,
            eod,
            max_equalized_odds_difference,
            "max_equalized_odds_difference",
            f"equalized odds difference is {eod:.3f}",
        )
    result = _finish(
        "positive_rate",
        feature,
        by_group,
        groups,
        frame,
        ratio,
        difference,
        judge,
        evidence,
        intervals,
    )
    result.extra = extra
    return result


def class_quality(
    correct: np.ndarray,
    classes: np.ndarray,
    evidence: Evidence,
    min_ratio: float | None,
    max_difference: float | None,
) -> CheckResult:
    """Per-class accuracy of generated images (did the classifier see the asked class?);
    higher is better. `correct` is 1 where it did."""

    def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return float(np.mean(y_pred))

    hits = np.asarray(correct, dtype=float)
    groups = group_labels([classes])
    frame = _frame(accuracy, hits, hits, groups, evidence)
    by_group = _by_group(frame)
    best, worst = max(by_group.values()), min(by_group.values())
    ratio = worst / best if best > 0 else 0.0
    intervals = _intervals(frame, evidence, invert_ratio=False)
    judge = _Judge(evidence, intervals)
    judge.at_least(
        "ratio",
        ratio,
        min_ratio,
        "min_ratio",
        f"accuracy on class {_argmin(by_group)} ({worst:.3f}) is {ratio:.3f} of class "
        f"{_argmax(by_group)}'s ({best:.3f})",
    )
    judge.at_most(
        "difference",
        best - worst,
        max_difference,
        "max_difference",
        f"class accuracies differ by {best - worst:.3f}",
    )
    return _finish(
        "class_accuracy",
        "class",
        by_group,
        groups,
        frame,
        ratio,
        best - worst,
        judge,
        evidence,
        intervals,
    )


class _Judge:
    """Compares figures with thresholds, on the point estimate or its whole interval."""

    def __init__(self, evidence: Evidence, intervals: dict[str, Any]):
        self.conservative = evidence.decision == "conservative"
        self.intervals = intervals
        self.thresholds: dict[str, float] = {}
        self.reasons: list[str] = []

    def at_most(
        self, figure: str | None, value: float, limit: float | None, name: str, what: str
    ) -> None:
        self._judge(figure, value, limit, name, what, upper=True)

    def at_least(
        self, figure: str | None, value: float, limit: float | None, name: str, what: str
    ) -> None:
        self._judge(figure, value, limit, name, what, upper=False)

    def _judge(
        self,
        figure: str | None,
        value: float,
        limit: float | None,
        name: str,
        what: str,
        upper: bool,
    ) -> None:
        if limit is None:
            return
        self.thresholds[name] = limit
        beyond = (lambda x: x > limit) if upper else (lambda x: x < limit)
        if beyond(value):
            self.reasons.append(f"{what}; {name} is {limit}")
            return
        interval = self.intervals.get(figure) if figure else None
        if self.conservative and interval is not None:
            end = interval[1] if upper else interval[0]
            if beyond(end) or math.isnan(end):
                level = f"{self.intervals['confidence']:.0%}"
                self.reasons.append(
                    f"{what}, but its {level} interval [{interval[0]:.4g}, {interval[1]:.4g}] "
                    f"reaches past {name} {limit} (decision: conservative); more evaluation "
                    "rows narrow it"
                )


def _frame(
    metric: Callable, y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, evidence: Evidence
) -> Any:
    from fairlearn.metrics import MetricFrame

    bootstrap = {}
    if evidence.n_boot:
        tail = (1 - evidence.confidence) / 2
        bootstrap = {
            "n_boot": evidence.n_boot,
            "ci_quantiles": [tail, 1 - tail],
            "random_state": evidence.seed,
        }
    return MetricFrame(
        metrics=metric, y_true=y_true, y_pred=y_pred, sensitive_features=groups, **bootstrap
    )


def _by_group(frame: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in frame.by_group.items()}


def _intervals(frame: Any, evidence: Evidence, invert_ratio: bool) -> dict[str, Any]:
    """The bootstrap intervals of every figure. MetricFrame's ratio is lowest / highest
    group; for losses raygen's ratio is worst / best = highest / lowest: its inverse."""
    if not evidence.n_boot:
        return {}
    low, high = frame.by_group_ci
    by_group = {str(g): [float(low[g]), float(high[g])] for g in low.index}
    ratio = [float(x) for x in frame.ratio_ci()]
    if invert_ratio:
        ratio = [
            1 / ratio[1] if ratio[1] > 0 else math.inf,
            1 / ratio[0] if ratio[0] > 0 else math.inf,
        ]
    return {
        "confidence": evidence.confidence,
        "n_boot": evidence.n_boot,
        "by_group": by_group,
        "overall": [float(x) for x in frame.overall_ci],
        "ratio": ratio,
        "difference": [float(x) for x in frame.difference_ci()],
    }


def _finish(
    metric: str,
    feature: str,
    by_group: dict[str, float],
    groups: np.ndarray,
    frame: Any,
    ratio: float,
    difference: float,
    judge: _Judge,
    evidence: Evidence,
    intervals: dict[str, Any],
) -> CheckResult:
    """Add the group-size rule: too few rows in a group (or an intersection's cell) fails
    the check, whatever the figures say."""
    names, counts = np.unique(np.asarray(groups, dtype=str), return_counts=True)
    sizes = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
    reasons = judge.reasons
    for name, size in sizes.items():
        if size < evidence.min_group_size:
            reasons.append(
                f"group {name} has {size} rows, fewer than min_group_size "
                f"{evidence.min_group_size}: insufficient evidence"
            )
    if len(sizes) < 2:
        reasons.append(f"`{feature}` has {len(sizes)} group(s); a comparison needs two or more")
    return CheckResult(
        metric=metric,
        feature=feature,
        by_group=by_group,
        counts=sizes,
        overall=float(frame.overall),
        ratio=ratio,
        difference=difference,
        thresholds=judge.thresholds,
        passed=not reasons,
        reasons=reasons,
        intervals=intervals,
        decision=evidence.decision,
    )


def _argmax(values: dict[str, float]) -> str:
    return max(values, key=values.__getitem__)


def _argmin(values: dict[str, float]) -> str:
    return min(values, key=values.__getitem__)
