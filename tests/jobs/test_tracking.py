"""Experiment tracking in MLflow: the embedded store every run gets, a real `mlflow server`
(SQLite store, artifacts on the test S3 server) that goes down mid-run, and the tracker's
own contract without Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from raygen.cluster.simulate import free_port
from raygen.jobs.loader import validate_spec
from raygen.jobs.spec import TrackingSpec, TrainSpec
from raygen.jobs.tracking import (
    KIND_TAG,
    TRACKING_FILE,
    Tracker,
    TrackingTarget,
    flatten,
    tracking_target,
)
from raygen.jobs.train.metrics import read_metrics
from tests.conftest import tiny_lm_spec

METRIC_KEYS = ("train_loss", "eval_loss", "lr")


def history(client: MlflowClient, run_id: str, key: str) -> set[tuple[int, float]]:
    return {(m.step, m.value) for m in client.get_metric_history(run_id, key)}


def rows_of(rows: list[dict], key: str) -> set[tuple[int, float]]:
    return {(r["step"], r[key]) for r in rows if key in r}


def test_a_run_is_one_mlflow_run_in_the_embedded_store_matching_its_files(lm_run):
    """No set-up: the run's parameters, every metric row, tags and artifacts are in the
    SQLite store under run.storage, and equal raygen's own files."""
    raw, result, run_dir, _ = lm_run
    tracking = result["tracking"]
    store = run_dir.parent / "mlflow.db"
    assert tracking["uri"] == f"sqlite:///{store}" and "unsent" not in tracking
    assert tracking["browse"] == f"mlflow ui --backend-store-uri sqlite:///{store}"
    assert json.loads((run_dir / TRACKING_FILE).read_text())["run_id"] == tracking["run_id"]
    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(tracking["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == raw["name"]
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    spec.pop("tracking")
    expected = flatten(spec)
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.data.params["train.lr"] == str(spec["train"]["lr"])
    rows = read_metrics(run_dir / "metrics.jsonl")
    for key in METRIC_KEYS:
        assert history(client, run.info.run_id, key) == rows_of(rows, key), key
    tags = run.data.tags
    assert tags[KIND_TAG] == "train" and tags["raygen.status"] == "completed"
    stats = json.loads((Path(raw["data"]["prepared"]) / "data_stats.json").read_text())
    assert tags["raygen.data_fingerprint"] == stats["fingerprint"]
    from raygen.jobs.model_hash import model_sha256

    assert tags["raygen.model_sha256"] == model_sha256(result["paths"]["model"])
    local = client.download_artifacts(run.info.run_id, "spec.yaml", str(run_dir.parent / "dl"))
    assert Path(local).read_text() == (run_dir / "spec.yaml").read_text()
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "spec.yaml",
        "data_stats.json",
    }
    # The artifacts live beside the database, not in the driver's working directory.
    assert run.info.artifact_uri.startswith((run_dir.parent / "mlartifacts").as_uri())


class MlflowServer:
    """`mlflow server` in a subprocess: a SQLite store, artifacts proxied to S3."""

    def __init__(self, root: Path, artifacts: str):
        self.root, self.artifacts = root, artifacts
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", self.artifacts,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
        log = (self.root / "server.log").open("a")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=log, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            # As a crashed server: no goodbye to its clients; its uvicorn worker too.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture
def mlflow_server(tmp_path, bucket):
    server = MlflowServer(tmp_path, f"s3://{bucket}/mlartifacts")
    server.start()
    yield server
    server.stop()


@pytest.mark.integration
def test_a_server_that_goes_down_mid_run_costs_nothing_and_the_next_launch_fills_the_gap(
    ray_session, tmp_path, shared_prepared, mlflow_server
):
    """The server dies at the first metric row: training finishes, the rows (and the
    registration) it did not take are reported; launched again, the run sends them."""
    from raygen.jobs.launch import launch

    raw = tiny_lm_spec(tmp_path, shared_prepared, train__max_steps=20, train__eval_every=10)
    raw["tracking"] = {"mlflow": {"uri": mlflow_server.uri, "experiment": "team", "timeout_s": 3}}
    raw["registry"] = {"name": "team-lm"}
    killed: list[int] = []

    def kill_server(row: dict) -> None:
        if not killed:
            mlflow_server.stop()
            killed.append(row["step"])

    result = launch(validate_spec(TrainSpec, raw, "test"), on_metrics=kill_server)
    assert result["status"] == "completed" and result["final_step"] == 20 and killed
    gap = result["tracking"]
    assert gap["unsent"]["metric_rows"] > 0 and "end" in gap["unsent"]["records"], gap
    assert "registration as team-lm" in gap["unsent"]["records"] and "registered" not in gap
    assert gap["error"] and gap["run_id"]
    recorded = json.loads((Path(result["paths"]["run_dir"]) / "result.json").read_text())
    assert recorded["tracking"]["unsent"] == gap["unsent"]

    mlflow_server.start()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    rows = read_metrics(Path(result["paths"]["run_dir"]) / "metrics.jsonl")
    assert history(client, gap["run_id"], "train_loss") < rows_of(rows, "train_loss")
    # Launched again as it is (nothing to train): the store gets what it missed.
    raw["tracking"]["mlflow"]["timeout_s"] = 60  # the model is uploaded to register it
    again = launch(validate_spec(TrainSpec, raw, "test"))
    assert again["up_to_date"] and "unsent" not in again["tracking"]
    # ... the model registered too: uploaded to the run (a server may not point at this
    # machine's disk), and tagged with where raygen keeps it.
    assert again["tracking"]["registered"] == "models:/team-lm/1"
    version = client.get_model_version("team-lm", "1")
    assert version.source == f"runs:/{gap['run_id']}/model" and version.run_id == gap["run_id"]
    assert version.tags["raygen.model"] == result["paths"]["model"]
    from raygen.jobs.model_hash import model_sha256

    assert version.tags["raygen.model_sha256"] == model_sha256(result["paths"]["model"])
    for key in METRIC_KEYS:
        assert history(client, gap["run_id"], key) == rows_of(rows, key), key
    run = client.get_run(gap["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "20"
    # Artifacts went through the server to S3.
    local = client.download_artifacts(gap["run_id"], "spec.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text()) == yaml.safe_load(
        (Path(result["paths"]["run_dir"]) / "spec.yaml").read_text()
    )
    import boto3

    bucket = mlflow_server.artifacts.split("/")[2]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("/artifacts/spec.yaml") for k in keys), keys


def test_an_unreachable_store_never_holds_a_run_up(tmp_path):
    """Nothing listens: each record returns at once, finishing waits only timeout_s, and
    the report says what did not get there."""
    target = TrackingTarget(f"http://127.0.0.1:{free_port()}", "x", timeout_s=4)
    started = time.monotonic()
    tracker = Tracker(target, str(tmp_path / TRACKING_FILE), "run", {"a": "1"}, {})
    tracker.log_rows([{"step": s, "logged_at": 1.0, "loss": 1.0 / s} for s in range(1, 300)])
    tracker.log_artifact(str(tmp_path))
    assert time.monotonic() - started < 0.5
    report = tracker.finish("FINISHED")
    assert time.monotonic() - started < 8
    assert report["run_id"] is None and report["unsent"]["metric_rows"] == 299
    assert report["unsent"]["records"][-1] == "end" and "127.0.0.1" in report["error"]
    assert not (tmp_path / TRACKING_FILE).exists()


def test_the_store_is_the_spec_s_then_the_environment_s_then_one_under_the_runs(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    embedded = tracking_target(TrackingSpec(), str(tmp_path / "runs"))
    assert embedded.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert embedded.artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()
    bucket_runs = tracking_target(TrackingSpec(), "s3://bucket/runs")
    assert bucket_runs.uri == f"sqlite:///{Path.home() / '.raygen' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_target(TrackingSpec(), "runs").uri == "http://tracking:5000"
    assert tracking_target(TrackingSpec(), "runs").artifact_location is None
    spec = TrackingSpec.model_validate({"mlflow": {"uri": "http://other:5000"}})
    assert tracking_target(spec, "runs").uri == "http://other:5000"
    assert tracking_target(TrackingSpec.model_validate({"mlflow": False}), "runs") is None
    assert TrackingSpec.model_validate({"mlflow": True}).mlflow.experiment == "raygen"


def test_tracking_settings_may_change_between_launches_of_a_run(tmp_path):
    """Where records go is not what trains: a re-run may switch tracking on, off or over."""
    from raygen.jobs.run_dir import check_same_run, record_spec

    raw = tiny_lm_spec(tmp_path)
    spec = validate_spec(TrainSpec, raw, "test")
    run_dir = str(tmp_path / "runs" / spec.name)
    record_spec(run_dir, spec, None)
    for tracking in ({"mlflow": False}, {"mlflow": {"uri": "http://tracking:5000"}}):
        changed = validate_spec(TrainSpec, {**raw, "tracking": tracking}, "test")
        assert check_same_run(changed, run_dir, "test") is not None


def test_a_launch_sends_the_rows_the_store_lacks_first_and_any_group_name(tmp_path):
    """Without Ray: a tracker given the rows of earlier launches sends only those past the
    step the store took, then the new ones; a group's name that MLflow would refuse as a
    metric name is made one it takes (not the whole batch dropped)."""
    target = TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", timeout_s=30)
    record = str(tmp_path / TRACKING_FILE)
    rows = [{"step": s, "logged_at": 1.0 + s, "train_loss": 1.0 / s} for s in range(1, 11)]
    first = Tracker(target, record, "run", {"a": "1"}, {}, backlog=lambda: rows[:4])
    first.log_rows(rows[4:6])
    assert first.finish("FINISHED").get("unsent") is None
    run_id = json.loads(Path(record).read_text())["run_id"]
    assert json.loads(Path(record).read_text())["logged_step"] == 6

    odd = {"step": 11, "logged_at": 12.0, "eval_loss/65+ (rare)": 2.0, "train_loss": 0.5}
    again = Tracker(target, record, "run", {"a": "1"}, {}, backlog=lambda: rows)
    again.log_rows([odd])
    report = again.finish("FINISHED")
    assert report["run_id"] == run_id and "refused" not in report, report
    client = MlflowClient(tracking_uri=target.uri)
    assert history(client, run_id, "train_loss") == rows_of([*rows, odd], "train_loss")
    assert history(client, run_id, "eval_loss/65_ _rare_") == {(11, 2.0)}
