"""The audit's figures against hand-computed per-group values (pure, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.fairness import class_quality, outcome_disparity, quality_of_service


def test_perplexity_per_group_ratio_and_difference():
    losses = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 4.0])
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    result = quality_of_service(losses, groups, "perplexity", "dialect", 2, 1.5, None)
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
    result = quality_of_service(losses, groups, "token_loss", "g", 2, 1.05, 0.01)
    assert result.by_group == pytest.approx({"x": 2.1, "y": 2.1})
    assert result.ratio == pytest.approx(1.0) and result.passed


def test_positive_rates_four_fifths_rule_and_equalized_odds():
    scores = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    groups = np.array(["a"] * 4 + ["b"] * 4)
    labels = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    result = outcome_disparity(scores, groups, "g", 4, 0.8, 0.1, labels, 0.3)
    assert result.by_group == {"a": 0.75, "b": 0.25}
    assert result.ratio == pytest.approx(1 / 3) and result.difference == pytest.approx(0.5)
    # TPR a 2/2, b 1/2 (diff .5); FPR a 1/2, b 0/2 (diff .5): equalized odds difference .5
    assert result.extra["equalized_odds_difference"] == pytest.approx(0.5)
    assert len(result.reasons) == 3 and not result.passed


def test_equal_rates_pass():
    scores = np.array([1, 0, 1, 0])
    result = outcome_disparity(scores, np.array(["a", "a", "b", "b"]), "g", 2, 0.8, 0.1)
    assert result.passed and result.ratio == 1.0 and result.difference == 0.0


def test_small_groups_fail_as_insufficient_even_when_figures_pass():
    scores = np.array([1, 0, 1, 0, 1, 0])
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    result = outcome_disparity(scores, groups, "g", 3, 0.8, None)
    assert result.ratio == 1.0 and not result.passed
    assert result.reasons == [
        "group b has 2 rows, fewer than min_group_size 3: insufficient evidence"
    ]


def test_one_group_cannot_be_compared():
    result = quality_of_service(np.ones(4), np.array(["a"] * 4), "token_loss", "g", 1, 2.0, None)
    assert not result.passed and "needs two or more" in result.reasons[0]


def test_class_accuracy_ratio_is_worst_over_best():
    correct = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    result = class_quality(correct, classes, 4, 0.8, None)
    assert result.by_group == {"0": 1.0, "1": 0.25}
    assert result.ratio == 0.25 and not result.passed
