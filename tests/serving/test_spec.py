"""Deploy specs: the shipped examples parse; bad values are named with their fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import SpecError
from jobs.loader import validate_spec
from serving.spec import DeploySpec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "serving" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path):
    from jobs.loader import load_spec

    spec = load_spec(DeploySpec, path)
    assert spec.name == path.stem


def problems(**raw) -> str:
    with pytest.raises(SpecError) as info:
        validate_spec(DeploySpec, {"name": "d", "model": "m", **raw}, "deploy.yaml")
    return str(info.value)


def test_bad_deploy_specs_name_the_key_and_the_fix():
    message = problems(
        autoscaling={"min_replicas": 3, "max_replicas": 2},
        filters={"blocklist": ["(unclosed"]},
        replica={"num_cpu": 1},
        route_prefix="v1",
    )
    assert "min_replicas (3) is above max_replicas (2); raise max_replicas" in message
    assert "'(unclosed' is not a valid regular expression" in message
    assert "`replica.num_cpu`: unknown key; did you mean `num_cpus`?" in message
    assert "`route_prefix`" in message


def test_scale_to_zero_is_allowed():
    spec = DeploySpec.model_validate(
        {"name": "d", "model": "m", "autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    )
    assert spec.autoscaling.min_replicas == 0
