"""Deploying test applications on the session's Serve (real HTTP on the session's port)."""

from __future__ import annotations

import time
from pathlib import Path

from raygen.serving.deploy import deploy, resolve_deploy_spec
from raygen.serving.gate import gate_arms
from raygen.serving.spec import DeploySpec


def start(name: str, model: Path, port: int, **sections) -> str:
    """Deploy `model` as application `name` under /<name>; returns its base URL."""
    raw = {
        "name": name,
        "model": str(model),
        "audit": str(Path(model).parent / "no-audit.json"),
        "route_prefix": f"/{name}",
        "replica": {"num_cpus": 0.25},
        "http": {"port": port},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        **sections,
    }
    spec = resolve_deploy_spec(DeploySpec.model_validate(raw), "test")
    # These tests are about serving mechanics; the audit gate has its own (test_audit.py).
    spec = gate_arms(spec, override_reason="serving mechanics test")
    return deploy(spec, embedded=True)["url"]


def stop(name: str) -> None:
    from ray import serve

    serve.delete(name)


def wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.5)
