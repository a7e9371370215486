"""The audit's figures against hand-computed per-group values (pure, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raygen.serving.audit.fairness import (
    Evidence,
    class_quality,
    outcome_disparity,
    quality_of_service,
)


def points(min_group_size: int) -> Evidence:
    """Point estimates only (the bootstrap has tests of its own)."""
    return Evidence(min_group_size=min_group_size, n_boot=0)


def test_perplexity_per_group_ratio_and_difference():
    losses = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 4.0])
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    result = quality_of_service(losses, groups, "perplexity", "dialect", points(2), 1.5, None)
    # group means: a 2.0, b 2.0, c 3.0; perplexity exp(mean)
    assert result.by_group == pytest.approx({"a": math.e**2, "b": math.e**2, "c": math.e**3})
    assert result.overall == pytest.approx(math.exp(14 / 6))
    assert result.ratio == pytest.approx(math.e)  # worst / best
    assert result.difference == pytest.approx(math.e**3 - math.e**2)
    assert not result.passed
    assert "2.718x the best" in result.reasons[0] and "(c:" in result.reasons[0]
    assert result.counts == {"a": 2, "b": 2, "c": 2}


def test_token_loss_passes_within_thresholds():
    losses = np.array([2.0, 2.2, 2.1, 2.1])
    groups = np.array(["x", "x", "y", "y"])
    result = quality_of_service(losses, groups, "token_loss", "g", points(2), 1.05, 0.01)
    assert result.by_group == pytest.approx({"x": 2.1, "y": 2.1})
    assert result.ratio == pytest.approx(1.0) and result.passed


def test_positive_rates_four_fifths_rule_and_equalized_odds():
    scores = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    groups = np.array(["a"] * 4 + ["b"] * 4)
    labels = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    result = outcome_disparity(scores, groups, "g", points(4), 0.8, 0.1, labels, 0.3)
    assert result.by_group == {"a": 0.75, "b": 0.25}
    assert result.ratio == pytest.approx(1 / 3) and result.difference == pytest.approx(0.5)
    # TPR a 2/2, b 1/2 (diff .5); FPR a 1/2, b 0/2 (diff .5): equalized odds difference .5
    assert result.extra["equalized_odds_difference"] == pytest.approx(0.5)
    assert len(result.reasons) == 3 and not result.passed


def test_equal_rates_pass():
    scores = np.array([1, 0, 1, 0])
    result = outcome_disparity(scores, np.array(["a", "a", "b", "b"]), "g", points(2), 0.8, 0.1)
    assert result.passed and result.ratio == 1.0 and result.difference == 0.0


def test_small_groups_fail_as_insufficient_even_when_figures_pass():
    scores = np.array([1, 0, 1, 0, 1, 0])
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    result = outcome_disparity(scores, groups, "g", points(3), 0.8, None)
    assert result.ratio == 1.0 and not result.passed
    assert result.reasons == [
        "group b has 2 rows, fewer than min_group_size 3: insufficient evidence"
    ]


def test_one_group_cannot_be_compared():
    result = quality_of_service(
        np.ones(4), np.array(["a"] * 4), "token_loss", "g", points(1), 2.0, None
    )
    assert not result.passed and "needs two or more" in result.reasons[0]


def test_class_accuracy_ratio_is_worst_over_best():
    correct = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    result = class_quality(correct, classes, points(4), 0.8, None)
    assert result.by_group == {"0": 1.0, "1": 0.25}
    assert result.ratio == 0.25 and not result.passed


# --- confidence intervals and decisions -----------------------------------------------------


def _known_gap(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive outcomes at rate 0.5 in group a and 0.4 in group b: true ratio 0.8."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.random(n) < 0.5, rng.random(n) < 0.4]).astype(int)
    return scores, np.array(["a"] * n + ["b"] * n)


def test_the_ratio_interval_covers_the_true_ratio():
    scores, groups = _known_gap(1500, seed=1)
    evidence = Evidence(min_group_size=30, n_boot=200, seed=0)
    result = outcome_disparity(scores, groups, "g", evidence, 0.7, None)
    low, high = result.intervals["ratio"]
    assert low < 0.8 < high and high - low < 0.15
    assert low <= result.ratio <= high
    for group, (lo, hi) in result.intervals["by_group"].items():
        assert lo <= result.by_group[group] <= hi
    assert result.intervals["confidence"] == 0.95 and result.intervals["n_boot"] == 200
    # Seeded: the same intervals again.
    again = outcome_disparity(scores, groups, "g", evidence, 0.7, None)
    assert again.intervals == result.intervals


def test_a_conservative_decision_fails_what_the_point_estimate_passes():
    # Few rows: the point ratio clears 0.7, the interval reaches below it.
    scores, groups = _known_gap(60, seed=3)
    point = outcome_disparity(scores, groups, "g", Evidence(30, 200, decision="point"), 0.7, None)
    careful = outcome_disparity(
        scores, groups, "g", Evidence(30, 200, decision="conservative"), 0.7, None
    )
    assert point.ratio >= 0.7 and point.passed, point.reasons
    assert careful.intervals["ratio"][0] < 0.7
    assert not careful.passed and "reaches past min_ratio 0.7" in careful.reasons[0]


def test_loss_ratios_are_worst_over_best_and_so_are_their_intervals():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(2.0, 0.1, 400), rng.normal(2.4, 0.1, 400)])
    groups = np.array(["a"] * 400 + ["b"] * 400)
    result = quality_of_service(losses, groups, "token_loss", "g", Evidence(30, 100), 1.1, None)
    low, high = result.intervals["ratio"]
    assert 1.15 < low <= result.ratio <= high < 1.25  # true ratio 1.2
    assert not result.passed


def test_every_cell_of_an_intersection_needs_min_group_size_rows():
    from raygen.serving.audit.fairness import group_labels

    style = np.array(["spaces"] * 60 + ["tabs"] * 60)
    quotes = np.array((["single"] * 50 + ["double"] * 10) * 2)
    scores = np.ones(120, dtype=int)
    alone = outcome_disparity(scores, group_labels([style]), "indent", points(30), 0.8, None)
    assert alone.passed
    cells = outcome_disparity(
        scores, group_labels([style, quotes]), "indent & quotes", points(30), 0.8, None
    )
    assert cells.counts == {
        "spaces & double": 10,
        "spaces & single": 50,
        "tabs & double": 10,
        "tabs & single": 50,
    }
    assert not cells.passed
    assert "group spaces & double has 10 rows, fewer than min_group_size 30" in cells.reasons[0]
