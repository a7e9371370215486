"""Training that loses nothing, tested by breaking things for real: a rank SIGKILLed while
its checkpoint is being written to S3, uploads failing between raygen and
the S3 server, a full disk while preparing data and while checkpointing.

This module runs its own local Ray, whose workers reach S3 through a fault-injecting proxy
(tests/cluster/faults.py); like the other cluster tests it runs before the session's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from raygen.cluster import publish
from raygen.cluster.storage import join, list_files, read_text
from raygen.jobs.run_dir import registered_checkpoints
from tests.cluster.faults import FaultProxy
from tests.conftest import tiny_lm_spec

# A GPT-2 big enough that writing a checkpoint takes a moment (~7M parameters: ~110 MB of
# weights and Adam state across the two ranks), small enough to train fast on a CPU.
WIDE = {"n_layer": 4, "n_embd": 384, "n_head": 6}


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    proxy = FaultProxy(s3_endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def chaos_ray(proxy):
    """A local Ray (2 CPUs) whose processes all reach S3 through the proxy."""
    import ray

    from raygen.cluster import simulate

    assert not ray.is_initialized() and not simulate.local_ray_running()
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.url  # Ray's workers inherit it from here
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        os.environ["AWS_ENDPOINT_URL"] = saved


def _launch_in_thread(raw: dict) -> tuple[threading.Thread, dict]:
    from raygen.jobs.launch import launch
    from raygen.jobs.spec import TrainSpec

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = launch(TrainSpec.model_validate(raw))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            import traceback

            outcome["error"] = exc
            outcome["traceback"] = traceback.format_exc()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _rank0_pid(run_dir: str) -> int | None:
    lines = (read_text(join(run_dir, "attempts.jsonl")) or "").splitlines()
    return json.loads(lines[-1])["rank0_pid"] if lines else None


def _checkpoint_dirs(run_dir: str) -> set[str]:
    try:
        files = list_files(run_dir, "")
    except Exception:
        return set()
    root = run_dir.rstrip("/")
    names = {f.uri[len(root) :].lstrip("/").split("/", 1)[0] for f in files}
    return {n for n in names if n.startswith("checkpoint_0")}


def test_a_rank_killed_while_its_checkpoint_is_written_resumes_from_a_registered_one(
    chaos_ray, bucket, shared_prepared, tmp_path
):
    """On an object store, where a checkpoint cannot be renamed into place: the half-written
    one is never resumed from, and is gone after the run. (Local storage's half-written
    checkpoints are covered by the full disk below.)"""
    storage = f"s3://{bucket}/runs"
    raw = tiny_lm_spec(
        tmp_path,
        shared_prepared,
        model={"arch": "gpt2", "config": WIDE},
        train__max_steps=20,
        train__checkpoint_every=10,
        train__eval_every=20,
        train__log_every=10,
        run__storage=storage,
        run__max_failures=3,
    )
    run_dir = join(storage, "tiny")
    thread, outcome = _launch_in_thread(raw)
    caught = None
    deadline = time.time() + 400
    while thread.is_alive() and time.time() < deadline and caught is None:
        registered = set(registered_checkpoints(run_dir) or [])
        writing = _checkpoint_dirs(run_dir) - registered
        pid = _rank0_pid(run_dir)
        if registered and writing and pid:
            os.kill(pid, signal.SIGKILL)  # mid-write: files in place, not yet registered
            caught = {"partial": max(writing), "registered": max(registered)}
        time.sleep(0.01)
    thread.join(timeout=600)
    assert caught, f"never caught a checkpoint being written: {outcome}"
    result = outcome.get("result")
    assert result and result["status"] == "completed" and result["final_step"] == 20, outcome
    restart = result["attempts"][1]
    assert restart["reason"] == "failed"
    # The registered checkpoint, not the half-written one.
    assert f"checkpoint_{restart['resumed_from_step']:08d}" == caught["registered"]
    assert caught["partial"] > caught["registered"]
    assert _checkpoint_dirs(run_dir) == set(registered_checkpoints(run_dir))  # none partial
    assert publish.state(join(run_dir, "model")) == "complete"


def test_failing_uploads_end_in_a_finished_run_or_a_clear_error_never_half_a_model(
    chaos_ray, proxy, bucket, tmp_path
):
    from raygen.cluster.storage import local_copy
    from raygen.serving.runtimes.common import detect_kind

    storage = f"s3://{bucket}/runs"
    raw = tiny_lm_spec(
        tmp_path,
        model={"arch": "gpt2", "config": WIDE},
        train__max_steps=30,
        train__checkpoint_every=10,
        train__eval_every=30,
        run__storage=storage,
        run__max_failures=6,
    )
    proxy.put_failure_rate = 0.1
    before = proxy.injected
    try:
        thread, outcome = _launch_in_thread(raw)
        thread.join(timeout=900)
    finally:
        proxy.put_failure_rate = 0.0
    assert proxy.injected > before  # faults were injected
    model = join(storage, "tiny", "model")
    state = publish.state(model)
    if "result" in outcome:
        assert outcome["result"]["status"] == "completed" and state == "complete"
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(local_copy(model))  # whole, and it loads
    else:
        error = str(outcome["error"])
        assert "Traceback" not in error and len(error.splitlines()) < 20, error
        assert state in ("absent", "interrupted")
        if state == "interrupted":  # serving and audits refuse it
            with pytest.raises(Exception, match="incomplete"):
                detect_kind(model)
    print(f"faults injected {proxy.injected - before}; outcome {sorted(outcome)}")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount point of a given size, unmounted after the test."""
    mounts: list[Path] = []

    def mount(name: str, size_kib: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here to fill a disk: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_while_preparing_is_a_clear_error_and_leaves_nothing(
    chaos_ray, small_disk, tmp_path
):
    from raygen.cluster.errors import StorageError
    from raygen.jobs.data.prepare import prepare_data
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.validate import validate_train_spec

    disk = small_disk("prepared", 64)
    raw = tiny_lm_spec(tmp_path, disk / "data")
    spec = validate_train_spec(TrainSpec.model_validate(raw), "t")
    with pytest.raises(StorageError) as info:
        prepare_data(spec, str(disk / "data"))
    assert "No space left on device" in str(info.value) and "nothing of it was kept" in str(
        info.value
    )
    assert list(disk.iterdir()) == []


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_whole(
    chaos_ray, small_disk, tmp_path
):
    from raygen.jobs.errors import TrainingFailed
    from raygen.jobs.export import export_checkpoint

    disk = small_disk("runs", CHECKPOINT_KIB * 3 // 2)  # room for one checkpoint, not two
    raw = tiny_lm_spec(
        tmp_path,
        tmp_path / "prepared",
        # Checkpoints some seconds apart, as in real runs: Ray Train registers each one
        # (its snapshot, and raygen's copy) before the next is written.
        train__max_steps=300,
        train__checkpoint_every=100,
        train__eval_every=300,
        train__log_every=50,
        run__storage=str(disk),
        run__max_failures=1,
    )
    thread, outcome = _launch_in_thread(raw)
    thread.join(timeout=600)
    error = outcome.get("error")
    assert isinstance(error, TrainingFailed), outcome
    assert "No space left on device" in str(error)
    run_dir = disk / "tiny"
    # Ray Train's snapshot (rewritten in place, it can be left empty by a full disk: raygen
    # then puts back the whole copy it keeps) still names the checkpoint: a re-run resumes.
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == [
        "checkpoint_00000100"
    ]
    assert _checkpoint_dirs(str(run_dir)) == {"checkpoint_00000100"}  # nothing partial left
    assert publish.state(str(run_dir / "model")) == "absent"
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    out = export_checkpoint(str(run_dir), str(run_dir / "checkpoint_00000100"), str(tmp_path / "m"))
    assert (Path(out) / "model.safetensors").is_file()  # the checkpoint kept is whole


# The tiny test model's checkpoint (weights, Adam state, both ranks' shards), in KiB, as
# measured (3,184): one fits in 1.5x of it with the run's small files, two do not.
CHECKPOINT_KIB = 3200
