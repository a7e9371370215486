"""Jobs on a real Ray cluster: a local head with Ray's fake multi-node autoscaler, mirroring
ray-cluster.yaml (head with 0 CPUs; worker nodes launched for pending work, removed when
idle), token authentication on. `raygen submit train` of the tiny model runs there through
the Jobs API: worker nodes are launched for it, it succeeds, its artifacts are where the
spec put them, Ray's own `ray job list` shows it, and the idle nodes go away after.

These run before any test starts the session's embedded Ray (tests/cluster/ is collected
first): two Rays on one machine confuse Ray Train's `address="auto"` lookups.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from raygen.cluster import simulate
from raygen.cluster.configs import load_cluster_config

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)
TOKEN = "raygen-test-token-3f1c9a"
SECRET = "sk-not-for-ray-7d2e"


def raygen(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raygen", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The simulated cluster: 1-CPU worker nodes, 6 s idle timeout; yields its addresses."""
    import ray

    assert not ray.is_initialized() and not simulate.local_ray_running(), (
        "another Ray runs here; the cluster tests must run before the session's Ray"
    )
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "PATH")}
    os.environ["RAY_AUTH_TOKEN"] = TOKEN  # the head's token, and the client's
    os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ["PATH"]  # `raygen` for the job
    fake, _ = simulate.simulation_config(
        load_cluster_config(ROOT / "ray-cluster.yaml"),
        idle_timeout_minutes=0.1,
        cpus_per_node=1,
        max_nodes=3,
    )
    started = simulate.start(fake)
    try:
        yield started
    finally:
        simulate.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A small working directory holding the tiny train spec; runs go outside it."""
    work = tmp_path_factory.mktemp("project")
    spec = yaml.safe_load((ROOT / "jobs/examples/code-lm-tiny.yaml").read_text())
    spec["name"] = "submitted"
    spec["data"].update(max_bytes=150_000, seq_len=64, eval_fraction=0.2)
    spec["tokenizer"] = {"train": {"vocab_size": 512}}
    spec["train"].update(
        max_steps=10,
        warmup_steps=2,
        eval_every=10,
        checkpoint_every=10,
        log_every=5,
        eval_batches=2,
    )
    spec["model"]["config"] = {"n_layer": 2, "n_embd": 64, "n_head": 4}
    spec["run"] = {"storage": str(work.parent / "cluster-runs")}
    (work / "specs").mkdir()
    (work / "specs" / "tiny.yaml").write_text(yaml.safe_dump(spec))
    return work


@pytest.fixture(scope="module")
def submitted(cluster, project) -> dict:
    """`raygen submit train --follow` on the cluster, watching the worker nodes meanwhile."""
    seen: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            with contextlib.suppress(requests.RequestException):  # head still starting
                seen.append(len(simulate.worker_nodes(cluster["dashboard"])))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    # Credentials set here stay here; only what --env names goes with the job.
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": SECRET, "RAYGEN_DEMO_SETTING": "on"}
    done = submit_tiny(
        cluster["dashboard"], "--follow", "--env", "RAYGEN_DEMO_SETTING", cwd=project, env=env
    )
    stop.set()
    watcher.join()
    return {"done": done, "workers_seen": seen}


def submit_tiny(address: str, *extra: str, cwd: Path, env: dict | None = None):
    """`raygen submit train specs/tiny.yaml --address ADDRESS EXTRA...` in `cwd`."""
    return raygen(
        "submit", "train", "specs/tiny.yaml", "--address", address, *extra, cwd=cwd, env=env
    )


def test_submitted_training_job_launches_workers_and_succeeds(submitted, project):
    done = submitted["done"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted raysubmit_" in done.stdout and "succeeded" in done.stdout
    assert "raygen train specs/tiny.yaml" in done.stdout
    assert "submitted reached step 10" in done.stdout  # the job's own output, streamed
    assert max(submitted["workers_seen"]) >= 2  # nodes launched for the 2 training workers
    run = project.parent / "cluster-runs" / "submitted"
    result = yaml.safe_load((run / "result.json").read_text())
    assert result["status"] == "completed" and result["final_step"] == 10
    assert (run / "model" / "model.safetensors").is_file()


def test_no_credential_reaches_the_jobs_record(submitted, cluster):
    from raygen.cluster.jobs import client

    done = submitted["done"]
    assert "environment forwarded: RAYGEN_DEMO_SETTING" in done.stdout
    job_id = done.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    jobs, _ = client(cluster["dashboard"])  # with the cluster's token, as raygen's commands
    record = jobs.get_job_info(job_id)
    assert record.runtime_env["env_vars"] == {"RAYGEN_DEMO_SETTING": "on"}
    assert SECRET not in json.dumps(record.dict() if hasattr(record, "dict") else vars(record))


def test_rays_own_job_list_and_raygen_jobs_show_it(submitted, cluster, project):
    job_id = submitted["done"].stdout.split("submitted ", 1)[1].split(":", 1)[0]
    listed = subprocess.run(
        [f"{VENV_BIN}/ray", "job", "list", "--address", cluster["dashboard"]],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},  # Ray's CLI sends the token only then
    )
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = raygen("jobs", "status", job_id, "--address", cluster["dashboard"], cwd=project)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = raygen("jobs", "logs", job_id, "--address", cluster["dashboard"], cwd=project)
    assert "submitted reached step 10" in logs.stdout
    missing = raygen(
        "jobs", "stop", "raysubmit_nope", "--address", cluster["dashboard"], cwd=project
    )
    assert missing.returncode == 2 and "no job 'raysubmit_nope'" in missing.stderr


def test_idle_workers_are_removed_after_the_timeout(submitted, cluster):
    deadline = time.time() + 120
    while time.time() < deadline and simulate.worker_nodes(cluster["dashboard"]):
        time.sleep(2)
    assert simulate.worker_nodes(cluster["dashboard"]) == []


def test_missing_or_wrong_token_is_explained(cluster, project, tmp_path):
    no_token = {"RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)}
    done = raygen("jobs", "list", "--address", cluster["dashboard"], cwd=project, env=no_token)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "requires a token (Ray token authentication) and none was found" in done.stderr
    assert "ray get-auth-token" in done.stderr
    wrong = raygen(
        "jobs",
        "list",
        "--address",
        cluster["dashboard"],
        cwd=project,
        env={"RAY_AUTH_TOKEN": "not-the-token"},
    )
    assert wrong.returncode == 2 and "refused the token from $RAY_AUTH_TOKEN" in wrong.stderr


def test_bad_address_and_oversized_upload_are_explained(cluster, project, tmp_path):
    done = submit_tiny("http://127.0.0.1:9", cwd=project)
    assert done.returncode == 2 and "nothing answers at http://127.0.0.1:9" in done.stderr
    big = tmp_path / "big"
    (big / "specs").mkdir(parents=True)
    (big / "specs" / "tiny.yaml").write_text((project / "specs" / "tiny.yaml").read_text())
    (big / "weights.bin").write_bytes(os.urandom(3 * 2**20))
    done = submit_tiny(cluster["dashboard"], cwd=big, env={"RAY_max_grpc_message_size": "1048576"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "over Ray's upload limit of 1.0 MiB" in done.stderr
    assert "weights.bin (3.0 MiB)" in done.stderr and ".rayignore" in done.stderr
    (big / ".rayignore").write_text("weights.bin\n")
    (big / "specs" / ".gitignore").write_text("tiny.yaml\n")
    done = submit_tiny(cluster["dashboard"], cwd=big, env={"RAY_max_grpc_message_size": "1048576"})
    assert done.returncode == 2 and "specs/tiny.yaml would not be uploaded" in done.stderr


def test_submit_checks_the_spec_before_contacting_anything(project, tmp_path):
    done = submit_tiny("http://127.0.0.1:9", "--set", "train.warmup_steps=50", cwd=project)
    assert done.returncode == 2 and "`train.warmup_steps`: 50 warm-up steps" in done.stderr
    done = submit_tiny("http://127.0.0.1:9", "--set", "run.storage=runs", cwd=project)
    assert done.returncode == 2 and "`run.storage`: 'runs' is relative" in done.stderr
    done = raygen(
        "submit", "train", str(tmp_path / "elsewhere.yaml"), "--address", "x:1", cwd=project
    )
    assert done.returncode == 2 and "outside the working directory" in done.stderr
    done = raygen("submit", "deploy", "specs/tiny.yaml", cwd=project)
    assert done.returncode == 2 and "'deploy' is not one of 'train'" in done.stderr
    done = submit_tiny("ray://head:10001", cwd=project)
    assert done.returncode == 2 and "not to a ray:// client address" in done.stderr
