"""Spot preemption for real: a local multi-node Ray (a head and three 1-CPU nodes, each its
own raylet on this machine, token authentication on), a 2-worker run, and a node running a
worker drained as preempted (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`), then
removed. The workers checkpoint at the notice and Ray Train restarts them on the nodes
left, from that step.

Like the other cluster tests, this runs before the session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_lm_spec

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def nodes():
    import ray
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray.cluster_utils import Cluster

    from raygen.cluster import simulate

    assert not ray.is_initialized() and not simulate.local_ray_running()
    saved = os.environ.get("RAY_AUTH_MODE")
    # RAY_AUTH_MODE=token for every node, and for this process: Ray reads the mode when it
    # is imported, and this refreshes it (what `ray.init` does for a new local cluster).
    _enable_token_auth()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _worker_nodes() -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100
    )
    return {a.node_id for a in actors}


def _records(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_preempted_node_costs_no_more_than_the_steps_since_its_notice(nodes, tmp_path):
    from raygen.jobs.launch import launch
    from raygen.jobs.spec import TrainSpec

    cluster, workers = nodes
    raw = tiny_lm_spec(
        tmp_path,
        train__max_steps=300,
        train__checkpoint_every=1000,  # no periodic checkpoint but the last: only the notice's
        train__eval_every=300,
        train__log_every=25,
        run__preemption_grace_s=0,
    )
    run_dir = tmp_path / "runs" / "tiny"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = launch(TrainSpec.model_validate(raw))
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not any(
        r.get("step", 0) >= 25 for r in _records(run_dir / "metrics.jsonl")
    ):
        assert thread.is_alive(), outcome
        time.sleep(0.5)
    # A node that runs a worker (not the head: the test removes it afterwards).
    by_id = {node.node_id: node for node in workers}
    busy = sorted(_worker_nodes() & set(by_id))
    assert busy, "no worker on a removable node"
    victim = by_id[busy[0]]
    drained = subprocess.run(
        [str(VENV_BIN / "ray"), "drain-node", "--address", cluster.address,
         "--node-id", victim.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
         "--reason-message", "spot instance reclaimed", "--deadline-remaining-seconds", "10"],
        capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    assert drained.returncode == 0, drained.stderr
    noticed_by = time.time() + 60
    while time.time() < noticed_by and not any(
        r.get("kind") == "preempted" for r in _records(run_dir / "failures.jsonl")
    ):
        time.sleep(0.2)
    notice = [r for r in _records(run_dir / "failures.jsonl") if r.get("kind") == "preempted"]
    assert notice, "the workers never saw the preemption notice"
    time.sleep(12)  # the reclaim: past the deadline the node goes away
    cluster.remove_node(victim)
    thread.join(timeout=600)

    result = outcome.get("result")
    assert result and result["status"] == "completed", outcome
    assert result["final_step"] == 300
    attempts = result["attempts"]
    assert [a["reason"] for a in attempts] == ["started", "preempted"]
    # Resumed from the checkpoint taken at the notice, not from the start.
    assert attempts[1]["resumed_from_step"] == notice[0]["step"] > 25
    assert notice[0]["nodes"] == [victim.node_id]
    steps = [r["step"] for r in _records(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 300
