"""Deploy specs: the shipped examples parse; bad values are named with their fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from raygen.jobs.errors import SpecError
from raygen.jobs.loader import validate_spec
from raygen.serving.spec import AuditSpec, DeploySpec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "serving" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path):
    from raygen.jobs.loader import load_spec

    if path.stem.endswith("-audit"):
        audit = load_spec(AuditSpec, path)
        assert audit.name == path.stem.replace("-audit", "-fairness")
        return
    spec = load_spec(DeploySpec, path)
    # A canary example names the application it is tried on.
    assert spec.name == path.stem.removesuffix("-canary")
    assert spec.audit and (path.parents[2] / spec.audit).is_file()
    if path.stem.endswith("-canary"):
        assert spec.canary and (path.parents[2] / str(spec.canary.audit)).is_file()


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


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_serving_where_others_can_reach_needs_keys_or_a_stated_choice(host, tmp_path):
    import subprocess
    import sys

    import yaml

    message = problems(http={"host": host})
    assert f"http.host is {host!r}" in message
    assert "auth.api_keys_env" in message and "auth.allow_anonymous: true" in message
    for auth in ({"api_keys_env": "KEYS"}, {"allow_anonymous": True}):
        DeploySpec.model_validate({"name": "d", "model": "m", "http": {"host": host}, "auth": auth})
    for loopback in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        DeploySpec.model_validate({"name": "d", "model": "m", "http": {"host": loopback}})
    spec = tmp_path / "open.yaml"
    spec.write_text(yaml.safe_dump({"name": "d", "model": "m", "http": {"host": host}}))
    done = subprocess.run(
        [sys.executable, "-m", "raygen", "serve", "build", str(spec)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "auth.allow_anonymous" in done.stderr
    assert "Traceback" not in done.stderr


def test_scale_to_zero_is_allowed():
    spec = DeploySpec.model_validate(
        {"name": "d", "model": "m", "autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    )
    assert spec.autoscaling.min_replicas == 0


def test_model_dirs_are_checked_before_anything_starts(tmp_path, monkeypatch):
    from raygen.serving.deploy import resolve_deploy_spec

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "gpt2"}')
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    monkeypatch.delenv("RAYGEN_NO_SUCH_KEYS", raising=False)
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(pickled): "safetensors weights only (no pickled .bin files)",
    }
    for model, expected in cases.items():
        spec = DeploySpec.model_validate(
            {
                "name": "d",
                "model": model,
                "replica": {"precision": "fp16"},
                "auth": {"api_keys_env": "RAYGEN_NO_SUCH_KEYS"},
            }
        )
        with pytest.raises(SpecError) as info:
            resolve_deploy_spec(spec, "deploy.yaml")
        message = str(info.value)
        assert expected in message
        assert "`replica.precision`: fp16 needs a GPU" in message
        assert "RAYGEN_NO_SUCH_KEYS is not set here" in message


def test_a_canary_is_checked_like_the_primary_and_must_be_another_model(tmp_path):
    from raygen.serving.deploy import resolve_deploy_spec

    model = str(tmp_path / "missing")
    spec = DeploySpec.model_validate(
        {
            "name": "d",
            "model": model,
            "audit": "a.json",
            "canary": {"model": model, "audit": "canary.txt", "traffic_percent": 5},
        }
    )
    with pytest.raises(SpecError) as info:
        resolve_deploy_spec(spec, "deploy.yaml")
    message = str(info.value)
    assert "`canary.model` is " in message and "the primary's own model" in message
    assert "`canary.model`: " in message and "does not exist" in message
    assert "`canary.audit`: canary.txt is neither an audit spec" in message


def test_serve_build_writes_a_serve_config_whose_builder_makes_the_app(tmp_path):
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from raygen.serving.deploy import write_serve_config
    from raygen.serving.router import build_app

    model = tmp_path / "model"
    model.mkdir()
    spec = DeploySpec.model_validate(
        {"name": "code-lm", "model": str(model), "autoscaling": {"max_replicas": 3}}
    )
    out = tmp_path / "serve-config.yaml"
    write_serve_config(spec, out)
    config = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(config)  # Serve's own schema for `serve deploy`
    app = config["applications"][0]
    assert app["import_path"] == "raygen.serving.router:build_app"
    assert DeploySpec.model_validate(app["args"]) == spec
    assert config["http_options"]["request_timeout_s"] == spec.http.request_timeout_s
    built = call_user_app_builder_with_args_if_necessary(build_app, app["args"])
    deployment = built._bound_deployment  # the primary, the ingress; no canary, nothing beside
    assert deployment.name == "primary" and len(deployment._replica_config.init_args) == 1
    assert deployment._deployment_config.user_config["rollout"] is False
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment._deployment_config.max_queued_requests == 64  # never unbounded
    assert deployment._deployment_config.backpressure_config.retry_after_s == 1
    with pytest.raises(Exception, match="max_replicas"):
        call_user_app_builder_with_args_if_necessary(
            build_app, {**app["args"], "autoscaling": {"max_replicas": 0}}
        )
