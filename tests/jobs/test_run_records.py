"""What a run writes about itself, without Ray: metrics on object storage, attempts and
interruptions, the rule that stops a run failing at the same point, and what a re-run may
change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raygen.cluster.storage import join, list_files, read_text, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.launch import SAME_STEP_FAILURES, FailureRecorder, RepeatedFailure
from raygen.jobs.run_dir import METRICS_FILE, check_same_run, read_attempts, record_spec
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train import metrics as m
from tests.conftest import tiny_lm_spec


def _parts(run_dir: str) -> list[str]:
    try:
        return [f.uri for f in list_files(join(run_dir, METRICS_FILE + m.PARTS_SUFFIX), "")]
    except Exception:
        return []


def test_remote_metrics_go_up_in_parts_not_whole_files(bucket, monkeypatch):
    run_dir = f"s3://{bucket}/runs/metered"
    writes: list[str] = []
    real = m.storage.write_text
    monkeypatch.setattr(
        m.storage, "write_text", lambda uri, text: (writes.append(uri), real(uri, text))
    )
    log = m.MetricsLog(run_dir, resumed_from_step=0)
    for step in range(1, 201):
        log.log({m.STEP: step, m.TRAIN_LOSS: 1.0 / step})
    log.sync()  # a checkpoint: what is new goes up
    # 200 rows: one part when the log opened, one at the checkpoint (PART_INTERVAL_S apart
    # at most otherwise), never the whole file per row.
    assert len(writes) == 2 and all(w.endswith(".jsonl") and ".d/" in w for w in writes)
    assert [r[m.STEP] for r in m.read_metrics(join(run_dir, METRICS_FILE))] == list(range(1, 201))
    # A restart from the checkpoint of step 150: later rows were not kept.
    again = m.MetricsLog(run_dir, resumed_from_step=150)
    for step in range(151, 171):
        again.log({m.STEP: step, m.TRAIN_LOSS: 0.5})
    again.sync()
    steps = [r[m.STEP] for r in m.read_metrics(join(run_dir, METRICS_FILE))]
    assert steps == list(range(1, 171))
    again.close()  # one file again, the parts gone
    assert not _parts(run_dir)
    text = read_text(join(run_dir, METRICS_FILE))
    assert [json.loads(line)[m.STEP] for line in text.splitlines()] == list(range(1, 171))


def test_attempts_say_why_each_started_and_torn_lines_are_skipped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    attempts = [
        {"started_at": 10.0, "resumed_from_step": 0},
        {"started_at": 20.0, "resumed_from_step": 40},
        {"started_at": 30.0, "resumed_from_step": 60},
        {"started_at": 40.0, "resumed_from_step": 80},
    ]
    interruptions = [
        {"at": 15.0, "kind": "failed", "error": "rank 1: worker process died"},
        {"at": 25.0, "kind": "preempted", "step": 60, "nodes": ["n1"]},
    ]
    (run / "attempts.jsonl").write_text(
        "".join(json.dumps(a) + "\n" for a in attempts) + '{"started_at": 50.0, "resum'
    )
    (run / "failures.jsonl").write_text("".join(json.dumps(i) + "\n" for i in interruptions))
    got = read_attempts(str(run))
    assert [a["reason"] for a in got] == ["started", "failed", "preempted", "resumed"]
    assert [a["resumed_from_step"] for a in got] == [0, 40, 60, 80]
    assert got[1]["previous_error"] == "rank 1: worker process died"


def test_a_run_failing_at_the_same_point_is_stopped_naming_the_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recorder = FailureRecorder(str(run))

    def attempt(step: int) -> None:
        with open(run / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"started_at": 0.0, "resumed_from_step": step}) + "\n")

    attempt(0)
    recorder.after_exception(None, {0: RuntimeError("CUDA error: illegal memory access")})
    attempt(20)  # progress between failures: not the same point
    for _ in range(SAME_STEP_FAILURES - 1):
        recorder.after_exception(None, {1: RuntimeError("CUDA error: illegal memory access")})
        attempt(20)
    with pytest.raises(RepeatedFailure) as info:
        recorder.after_exception(None, {1: RuntimeError("CUDA error: illegal memory access")})
    assert f"{SAME_STEP_FAILURES} failures in a row" in str(info.value)
    assert "resuming from step 20" in str(info.value)
    assert "rank 1: CUDA error: illegal memory access" in str(info.value)
    kinds = [json.loads(line)["kind"] for line in (run / "failures.jsonl").read_text().splitlines()]
    assert kinds == ["failed"] * (SAME_STEP_FAILURES + 1)


def test_a_rerun_may_change_the_schedule_but_not_what_is_trained(tmp_path):
    raw = tiny_lm_spec(tmp_path)
    spec = TrainSpec.model_validate(raw)
    run_dir = str(tmp_path / "runs" / "tiny")
    assert check_same_run(spec, run_dir, "spec.yaml") is None  # a new run
    record_spec(run_dir, spec, None)
    longer = TrainSpec.model_validate(
        {**raw, "train": {**raw["train"], "max_steps": 400, "eval_every": 40}}
    )
    recorded = check_same_run(longer, run_dir, "spec.yaml")
    record_spec(run_dir, longer, recorded)
    history = list(Path(run_dir, "spec_history").glob("*.yaml"))
    assert len(history) == 1 and yaml.safe_load(history[0].read_text())["train"]["max_steps"] == 40
    changed = {
        **raw,
        "train": {**raw["train"], "max_steps": 400, "eval_every": 40, "lr": 1e-2},
        "data": {**raw["data"], "seq_len": 128},
        "deepspeed": {"zero_stage": 3},
    }
    with pytest.raises(SpecError) as info:
        check_same_run(TrainSpec.model_validate(changed), run_dir, "spec.yaml")
    message = str(info.value)
    assert "`train.lr`: was 0.003, now 0.01" in message
    assert "`data.seq_len`: was 64, now 128" in message
    assert "`deepspeed.zero_stage`: was 2, now 3" in message
    assert "max_steps" not in message.split("\n")[1] and "--fresh" in message


def test_the_data_fingerprint_follows_contents_not_names(tmp_path):
    from raygen.jobs.data.prepare import data_fingerprint

    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    (tokenizer / "tokenizer_config.json").write_text("{}")
    corpus = tmp_path / "corpus.parquet"
    write_text(str(corpus), "not read here")  # listed and hashed, not parsed
    raw = tiny_lm_spec(tmp_path, data={"train": str(corpus)}, tokenizer={"path": str(tokenizer)})
    spec = TrainSpec.model_validate(raw)
    first = data_fingerprint(spec)
    (tokenizer / "tokenizer.json").write_text('{"vocab": {"a": 0}}')  # rewritten, same bytes
    assert data_fingerprint(spec) == first
    (tokenizer / "tokenizer.json").write_text('{"vocab": {"b": 0}}')  # replaced in place
    second = data_fingerprint(spec)
    assert second != first
    write_text(str(corpus), "not read hera")  # same size, other bytes
    assert data_fingerprint(spec) not in (first, second)


def test_a_torn_checkpoint_snapshot_is_repaired_and_never_deletes_checkpoints(tmp_path):
    from raygen.cluster import publish
    from raygen.jobs.run_dir import (
        SNAPSHOT_COPY,
        SNAPSHOT_FILE,
        copy_snapshot,
        remove_unregistered_checkpoints,
        repair_snapshot,
    )

    run = tmp_path / "run"
    for name in ("checkpoint_00000010", "checkpoint_00000020"):
        (run / name).mkdir(parents=True)
        (run / name / "latest").write_text("step")
    publish.mark(str(run), "run")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000010"}]}
    (run / SNAPSHOT_FILE).write_text("")  # torn, and no copy: nothing can be told apart
    assert remove_unregistered_checkpoints(str(run)) == []
    assert (run / "checkpoint_00000020").is_dir()
    (run / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    copy_snapshot(str(run))
    assert json.loads((run / SNAPSHOT_COPY).read_text()) == snapshot
    (run / SNAPSHOT_FILE).write_text('{"checkpoint_res')  # a full disk cut the rewrite
    repair_snapshot(str(run))
    assert json.loads((run / SNAPSHOT_FILE).read_text()) == snapshot
    assert remove_unregistered_checkpoints(str(run)) == ["checkpoint_00000020"]
    assert (run / "checkpoint_00000010").is_dir() and not (run / "checkpoint_00000020").exists()
