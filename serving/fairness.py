"""The audit's figures: per-group metrics with Fairlearn, compared with thresholds.

Pure (numpy, pandas, Fairlearn): the audit job computes each row's loss, completion score
or generated image's class, and these functions turn them into a check result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class CheckResult:
    """One check on one sensitive feature, as written to audit.json."""

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def quality_of_service(
    row_losses: np.ndarray,
    groups: np.ndarray,
    metric: str,
    feature: str,
    min_group_size: int,
    max_ratio: float | None,
    max_difference: float | None,
) -> CheckResult:
    """Per-group mean token loss, or perplexity = exp(mean token loss); lower is better.

    Args:
        row_losses: each row's mean token loss (nats).
        groups: each row's group in `feature`.
        metric: `token_loss` or `perplexity`.
    """
    from fairlearn.metrics import MetricFrame

    def value(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        mean = float(np.mean(y_pred))
        return math.exp(mean) if metric == "perplexity" else mean

    losses = np.asarray(row_losses, dtype=float)
    frame = MetricFrame(
        metrics=value, y_true=losses, y_pred=losses, sensitive_features=_labels(groups)
    )
    by_group = {str(k): float(v) for k, v in frame.by_group.items()}
    best, worst = min(by_group.values()), max(by_group.values())
    ratio = worst / best if best > 0 else math.inf
    thresholds = _drop_none(max_ratio=max_ratio, max_difference=max_difference)
    reasons = []
    if max_ratio is not None and ratio > max_ratio:
        reasons.append(
            f"{metric} of the worst group ({_argmax(by_group)}: {worst:.4g}) is {ratio:.3f}x "
            f"the best ({_argmin(by_group)}: {best:.4g}); max_ratio is {max_ratio}"
        )
    if max_difference is not None and worst - best > max_difference:
        reasons.append(
            f"{metric} differs by {worst - best:.4g} between groups {_argmax(by_group)} and "
            f"{_argmin(by_group)}; max_difference is {max_difference}"
        )
    return _finish(
        metric,
        feature,
        by_group,
        groups,
        float(frame.overall),
        ratio,
        worst - best,
        thresholds,
        reasons,
        min_group_size,
    )


def outcome_disparity(
    scores: np.ndarray,
    groups: np.ndarray,
    feature: str,
    min_group_size: int,
    min_ratio: float | None,
    max_difference: float | None,
    labels: np.ndarray | None = None,
    max_equalized_odds_difference: float | None = None,
) -> CheckResult:
    """Selection rate (share of 1s) per group; demographic parity ratio and difference, and
    with labels the equalized odds difference."""
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equalized_odds_difference,
        selection_rate,
    )

    y_pred = np.asarray(scores, dtype=int)
    y_true = np.asarray(labels, dtype=int) if labels is not None else y_pred
    sensitive = _labels(groups)
    frame = MetricFrame(
        metrics=selection_rate, y_true=y_true, y_pred=y_pred, sensitive_features=sensitive
    )
    by_group = {str(k): float(v) for k, v in frame.by_group.items()}
    # Every group at rate 0 is parity (Fairlearn's 0/0 would be NaN).
    top = max(by_group.values())
    ratio = (
        float(demographic_parity_ratio(y_true, y_pred, sensitive_features=sensitive))
        if top > 0
        else 1.0
    )
    difference = float(demographic_parity_difference(y_true, y_pred, sensitive_features=sensitive))
    thresholds = _drop_none(
        min_ratio=min_ratio,
        max_difference=max_difference,
        max_equalized_odds_difference=max_equalized_odds_difference,
    )
    reasons = []
    low, high = _argmin(by_group), _argmax(by_group)
    if min_ratio is not None and ratio < min_ratio:
        reasons.append(
            f"positive rate of {low} ({by_group[low]:.3f}) is {ratio:.3f} of {high}'s "
            f"({by_group[high]:.3f}); min_ratio is {min_ratio}"
        )
    if max_difference is not None and difference > max_difference:
        reasons.append(
            f"positive rates of {high} and {low} differ by {difference:.3f}; max_difference "
            f"is {max_difference}"
        )
    extra = {}
    if labels is not None:
        eod = float(equalized_odds_difference(y_true, y_pred, sensitive_features=sensitive))
        extra["equalized_odds_difference"] = eod
        if max_equalized_odds_difference is not None and eod > max_equalized_odds_difference:
            reasons.append(
                f"equalized odds difference is {eod:.3f}; max_equalized_odds_difference is "
                f"{max_equalized_odds_difference}"
            )
    result = _finish(
        "positive_rate",
        feature,
        by_group,
        groups,
        float(frame.overall),
        ratio,
        difference,
        thresholds,
        reasons,
        min_group_size,
    )
    result.extra = extra
    return result


def class_quality(
    correct: np.ndarray,
    classes: np.ndarray,
    min_group_size: int,
    min_ratio: float | None,
    max_difference: float | None,
) -> CheckResult:
    """Per-class accuracy of generated images (did the classifier see the asked class?);
    higher is better. `correct` is 1 where it did."""
    from fairlearn.metrics import MetricFrame

    def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return float(np.mean(y_pred))

    hits = np.asarray(correct, dtype=float)
    frame = MetricFrame(
        metrics=accuracy, y_true=hits, y_pred=hits, sensitive_features=_labels(classes)
    )
    by_group = {str(k): float(v) for k, v in frame.by_group.items()}
    best, worst = max(by_group.values()), min(by_group.values())
    ratio = worst / best if best > 0 else 0.0
    thresholds = _drop_none(min_ratio=min_ratio, max_difference=max_difference)
    reasons = []
    if min_ratio is not None and ratio < min_ratio:
        reasons.append(
            f"accuracy on class {_argmin(by_group)} ({worst:.3f}) is {ratio:.3f} of class "
            f"{_argmax(by_group)}'s ({best:.3f}); min_ratio is {min_ratio}"
        )
    if max_difference is not None and best - worst > max_difference:
        reasons.append(
            f"class accuracies differ by {best - worst:.3f}; max_difference is {max_difference}"
        )
    return _finish(
        "class_accuracy",
        "class",
        by_group,
        classes,
        float(frame.overall),
        ratio,
        best - worst,
        thresholds,
        reasons,
        min_group_size,
    )


def _finish(
    metric: str,
    feature: str,
    by_group: dict[str, float],
    groups: np.ndarray,
    overall: float,
    ratio: float,
    difference: float,
    thresholds: dict[str, float],
    reasons: list[str],
    min_group_size: int,
) -> CheckResult:
    """Add the group-size rule: too few rows in a group fails the check, whatever the
    figures say."""
    names, counts = np.unique(_labels(groups), return_counts=True)
    sizes = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
    for name, size in sizes.items():
        if size < min_group_size:
            reasons.append(
                f"group {name} has {size} rows, fewer than min_group_size {min_group_size}: "
                "insufficient evidence"
            )
    if len(sizes) < 2:
        reasons.append(f"`{feature}` has {len(sizes)} group(s); a comparison needs two or more")
    return CheckResult(
        metric=metric,
        feature=feature,
        by_group=by_group,
        counts=sizes,
        overall=overall,
        ratio=ratio,
        difference=difference,
        thresholds=thresholds,
        passed=not reasons,
        reasons=reasons,
    )


def _labels(groups: np.ndarray) -> np.ndarray:
    return np.asarray([str(g) for g in groups], dtype=object)


def _argmax(values: dict[str, float]) -> str:
    return max(values, key=values.__getitem__)


def _argmin(values: dict[str, float]) -> str:
    return min(values, key=values.__getitem__)


def _drop_none(**values: float | None) -> dict[str, float]:
    return {k: v for k, v in values.items() if v is not None}
