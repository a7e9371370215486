"""The router's choices, without Ray: which arm answers a request, and when a canary is
promoted or rolled back."""

from __future__ import annotations

import random

import pytest

from raygen.serving.router import PROMOTE, ROLLBACK, ArmFigures, arm_for, judge, wilson_low
from raygen.serving.spec import CANARY, PRIMARY, CanarySpec, DeploySpec, arm_specs


def figures(requests: int, errors: int = 0, filtered: int = 0, ms: float = 50) -> ArmFigures:
    arm = ArmFigures()
    for i in range(requests):
        arm.add(500 if i < errors else 200, ms / 1000, i < filtered)
    return arm


def canary(**overrides) -> CanarySpec:
    return CanarySpec.model_validate({"model": "m", "traffic_percent": 30, **overrides})


def test_the_canary_gets_its_share_and_a_user_always_the_same_arm():
    random.seed(0)
    arms = [arm_for(None, 30) for _ in range(20_000)]
    assert arms.count(CANARY) / len(arms) == pytest.approx(0.30, abs=0.01)
    users = [f"user-{i}" for i in range(5_000)]
    first = [arm_for(u, 30) for u in users]
    assert first.count(CANARY) / len(users) == pytest.approx(0.30, abs=0.02)
    assert [arm_for(u, 30) for u in users] == first
    # Raising the share moves users onto the canary only, never off it.
    assert all(arm_for(u, 60) == CANARY for u, a in zip(users, first, strict=True) if a == CANARY)


def test_wilson_low_is_cautious_with_few_requests():
    assert wilson_low(0, 0) == 0.0
    assert wilson_low(1, 10) < 0.03  # one failure in ten proves little
    assert wilson_low(10, 10) > 0.7  # ten in ten proves a lot
    assert wilson_low(300, 1000) == pytest.approx(0.276, abs=0.002)


def test_a_failing_canary_is_rolled_back_on_evidence_not_on_one_error():
    spec = canary(rollback_if={"error_rate": 0.05})
    assert judge(spec, figures(100), figures(10, errors=1), 5) is None
    assert judge(spec, figures(100), figures(9, errors=9), 5) is None  # too few to judge
    action, why = judge(spec, figures(100), figures(12, errors=6), 5)
    assert action == ROLLBACK and "error rate is 6/12" in why
    # Compared with the primary: a primary failing as often leaves the canary standing.
    assert judge(spec, figures(100, errors=50), figures(12, errors=6), 5) is None


def test_filtered_outputs_and_latency_roll_back_when_asked():
    spec = canary(rollback_if={"error_rate": None, "filtered_rate": 0.1, "p99_latency_ms": 200})
    action, why = judge(spec, figures(200), figures(40, filtered=20), 5)
    assert action == ROLLBACK and "filtered-output rate" in why
    # Latency is judged once both arms have 100 requests.
    assert judge(spec, figures(200), figures(99, ms=900), 5) is None
    action, why = judge(spec, figures(200), figures(100, ms=900), 5)
    assert action == ROLLBACK and "p99 latency is 900 ms" in why


def test_promotion_needs_both_requests_and_seconds():
    spec = canary(promote_after={"requests": 50, "seconds": 60})
    assert judge(spec, figures(100), figures(49), 120) is None
    assert judge(spec, figures(100), figures(50), 59) is None
    action, why = judge(spec, figures(100), figures(50), 60)
    assert action == PROMOTE and "50 requests" in why


def test_the_canary_arm_is_the_primary_spec_with_the_canarys_model_and_gate():
    spec = DeploySpec.model_validate(
        {
            "name": "app",
            "model": "runs/a/model",
            "audit": "a.json",
            "limits": {"max_tokens": 7},
            "canary": {"model": "runs/b/model", "audit": "b.json", "traffic_percent": 10},
        }
    )
    arms = arm_specs(spec)
    assert set(arms) == {PRIMARY, CANARY}
    assert arms[CANARY].model == "runs/b/model" and arms[CANARY].audit == "b.json"
    assert arms[CANARY].limits.max_tokens == 7 and arms[CANARY].canary is None
    assert arms[PRIMARY].model == "runs/a/model" and arms[PRIMARY].canary is None
    with pytest.raises(ValueError, match="traffic_percent"):
        canary(traffic_percent=100)
