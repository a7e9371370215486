"""Real sweeps on the session's local Ray: every trial is a raygen training run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raygen.tuning.spec import SweepSpec
from raygen.tuning.sweep import run_sweep
from tests.conftest import tiny_lm_spec

GOOD_LR, BAD_LR = 3e-3, 1e-7  # a learning rate that learns, and one that cannot


def sweep_of(
    tmp_path: Path, prepared: Path, tracked: bool = False, **fields
) -> tuple[SweepSpec, dict]:
    """A sweep over the tiny LM: 1 worker per trial, 30 steps, an evaluation every 10;
    tracked in MLflow only when `tracked` (each trial's process would import MLflow: on 2
    CPUs, seconds the tests not about tracking need not spend)."""
    base = tiny_lm_spec(
        tmp_path,
        prepared,
        scaling__num_workers=1,
        train__max_steps=30,
        train__eval_every=10,
        train__warmup_steps=0,
        train__eval_batches=2,
    )
    if not tracked:
        base["tracking"] = {"mlflow": False}
    raw = {
        "name": "sweep",
        "base": "unused.yaml",
        "search": {"train.lr": {"grid": [GOOD_LR, BAD_LR]}},
        "max_concurrent_trials": 1,
        "run": {"storage": str(tmp_path / "sweeps")},
        **fields,
    }
    return SweepSpec.model_validate(raw), base


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory, shared_prepared):
    tmp_path = tmp_path_factory.mktemp("asha")
    sweep, base = sweep_of(tmp_path, shared_prepared, scheduler={"type": "asha", "grace_period": 1})
    lines: list[str] = []
    return sweep, run_sweep(sweep, base, "test", on_progress=lines.append), lines


def test_asha_stops_the_clearly_bad_trial_early(asha_sweep):
    _, summary, lines = asha_sweep
    by_lr = {row["config.train.lr"]: row for row in summary["trials"]}
    assert by_lr[GOOD_LR]["status"] == "completed" and by_lr[GOOD_LR]["iterations"] == 3
    assert by_lr[BAD_LR]["status"] == "stopped_early" and by_lr[BAD_LR]["iterations"] == 1
    assert any("eval_loss" in line and "best" in line for line in lines)  # live progress


def test_trials_table_best_json_and_plot(asha_sweep):
    sweep, summary, _ = asha_sweep
    sweep_dir = Path(summary["sweep_dir"])
    table = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert {
        "trial_id", "status", "iterations", "best_eval_loss", "last_eval_loss", "checkpoint",
        "config.train.lr",
    } <= set(table[0])  # fmt: skip
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["value"] == min(row["best_eval_loss"] for row in table)
    assert best["config"] == {"train.lr": GOOD_LR}
    assert best["spec"]["train"]["lr"] == GOOD_LR
    assert Path(best["checkpoint"]).name.startswith("checkpoint_")
    assert (sweep_dir / "metric.png").stat().st_size > 1000
    # Trial runs are named by trial id, never by time.
    assert {p.name for p in (sweep_dir / "trials").iterdir()} == {r["trial_id"] for r in table}


def test_best_checkpoint_exports_a_model_transformers_loads(asha_sweep, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raygen.jobs.export import export_checkpoint

    best = asha_sweep[1]["best"]
    out = export_checkpoint(best["run_dir"], best["checkpoint"], str(tmp_path / "best"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def f(x):\n", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_every_stopped_trials_resources_are_released_so_waiting_trials_run(
    ray_session, tmp_path, shared_prepared
):
    """Six trials of one worker, two at a time, on 2 CPUs, ASHA stopping some early and
    three erroring at their start (a batch larger than the data): the sweep finishes, errored
    trials are reported and the others go on, and each trial's worker group's placement
    group is gone soon after the trial's last report (a group left behind holds a CPU the
    next trial waits for forever)."""
    import threading
    import time

    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup

    sweep, base = sweep_of(
        tmp_path,
        shared_prepared,
        search={
            "train.lr": {"grid": [GOOD_LR, BAD_LR, 2e-3]},  # the third waits for a CPU
            "train.micro_batch_size": {"grid": [8, 100_000]},
        },
        max_concurrent_trials=2,
        scheduler={"type": "asha", "grace_period": 1},
    )
    trials = tmp_path / "sweeps" / "sweep" / "trials"
    removed_at: dict[str, float] = {}  # placement group -> when first seen removed
    groups: dict[str, str] = {}  # placement group -> trial run
    stop = threading.Event()

    def watch() -> None:
        import ray

        while not stop.wait(0.25):
            for attempts in trials.glob("*/attempts.jsonl"):
                for line in attempts.read_text().splitlines():
                    group = json.loads(line).get("placement_group")
                    if group:
                        groups.setdefault(group, attempts.parent.name)
            for group in set(groups) - set(removed_at):
                pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group)))
                if placement_group_table(pg).get("state") in (None, "REMOVED"):
                    removed_at[group] = time.time()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = run_sweep(sweep, base, "test")
    time.sleep(1)
    stop.set()
    watcher.join()
    assert len(summary["trials"]) == 6
    errored = [r for r in summary["trials"] if r["config.train.micro_batch_size"] == 100_000]
    ran = [r for r in summary["trials"] if r["config.train.micro_batch_size"] == 8]
    for row in errored:
        assert row["status"] == "errored"
        assert "one optimizer step takes micro_batch_size x grad_accum" in row["error"]
    assert {r["status"] for r in ran} <= {"completed", "stopped_early"}, ran
    assert summary["best"]["config"]["train.micro_batch_size"] == 8
    # Errored trials failed before starting workers; every trial that did released them.
    assert sorted(set(groups.values())) == sorted(r["trial_id"] for r in ran)
    sweep_dir = Path(summary["sweep_dir"])
    delays = {}
    for group, run in groups.items():
        (results,) = sweep_dir.glob(f"trial_driver_{run}_*/result.json")
        last_report = json.loads(results.read_text().splitlines()[-1])["timestamp"]
        assert group in removed_at, f"trial {run}'s placement group was never released"
        delays[run] = round(removed_at[group] - last_report, 1)
    print("placement groups released after the trial's last report (s):", delays)
    # Whole seconds in Tune's timestamps; raygen removes a leftover 20 s after a stop.
    assert max(delays.values()) < 25, delays


def test_a_sweep_whose_trials_cannot_get_resources_stops_naming_them(
    ray_session, tmp_path, shared_prepared
):
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raygen.tuning.errors import SweepStalled

    # One of the session's two CPUs held elsewhere; the trial's two workers need both.
    hog = placement_group([{"CPU": 1}])
    ray.get(hog.ready(), timeout=60)
    try:
        sweep, base = sweep_of(
            tmp_path,
            shared_prepared,
            search={"train.lr": {"grid": [GOOD_LR]}},
            scheduler={"type": "fifo"},
            run={"storage": str(tmp_path / "sweeps"), "pending_timeout_s": 10},
        )
        base["scaling"]["num_workers"] = 2
        with pytest.raises(SweepStalled) as info:
            run_sweep(sweep, base, "test")
    finally:
        remove_placement_group(hog)
    message = str(info.value)
    # Each worker by default: its share of the 2 CPUs, less the trial driver's 0.01.
    assert "waited" in message and "[{'CPU': 0.99}, {'CPU': 0.99}]" in message, message
    assert "free of" in message and "run.pending_timeout_s (10 s)" in message
    # What the trial waited for does not linger to take the CPUs when they come free.
    from ray.util.state import list_placement_groups

    time.sleep(3)
    left = [g for g in list_placement_groups(limit=10_000) if g.state != "REMOVED"]
    assert not left, left


def test_successive_halving_pauses_at_the_rung_and_resumes_the_winner(
    ray_session, tmp_path, shared_prepared
):
    """One trial at a time: the good one pauses at its first evaluation until the bad one
    has had its own; then the bad one stops and the good one continues from its checkpoint."""
    sweep, base = sweep_of(
        tmp_path,
        shared_prepared,
        tracked=True,
        scheduler={"type": "successive_halving", "grace_period": 1, "reduction_factor": 2},
    )
    summary = run_sweep(sweep, base, "test")
    by_lr = {row["config.train.lr"]: row for row in summary["trials"]}
    assert by_lr[GOOD_LR]["status"] == "completed" and by_lr[GOOD_LR]["iterations"] == 3
    assert by_lr[BAD_LR]["status"] == "stopped_early" and by_lr[BAD_LR]["iterations"] == 1
    run = Path(summary["sweep_dir"]) / "trials" / by_lr[GOOD_LR]["trial_id"]
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").open()]
    assert [a["resumed_from_step"] for a in attempts] == [0, 10]  # paused, then resumed
    assert summary["best"]["config"] == {"train.lr": GOOD_LR}
    # Tracked as one parent run (in the embedded store under the sweep's storage) with a
    # child run per trial, each marked with how its trial ended.
    from mlflow import MlflowClient

    tracking = summary["tracking"]
    assert tracking["uri"] == f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking["uri"])
    parent = client.get_run(tracking["run_id"])
    assert parent.data.tags["raygen.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_eval_loss"] == summary["best"]["value"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "trials.parquet", "best.json", "metric.png"
    }  # fmt: skip
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {c.info.run_name: c.data.tags["raygen.status"] for c in children} == {
        row["trial_id"]: row["status"] for row in summary["trials"]
    }
    ended = {c.info.run_name: c.info.status for c in children}
    assert ended == {by_lr[GOOD_LR]["trial_id"]: "FINISHED", by_lr[BAD_LR]["trial_id"]: "KILLED"}


def test_pbt_copies_the_good_trials_checkpoint_into_the_bad_one(
    ray_session, tmp_path, shared_prepared
):
    """At the first evaluation the bad trial continues from the good one's checkpoint."""
    sweep, base = sweep_of(
        tmp_path,
        shared_prepared,
        max_concurrent_trials=2,
        scheduler={"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5},
    )
    base["train"]["max_steps"] = 20
    summary = run_sweep(sweep, base, "test")
    trials_dir = Path(summary["sweep_dir"]) / "trials"
    # `<trial>-from-<donor>-<step>`: runs that continued another trial's checkpoint.
    exploited = {
        int(p.name.rsplit("-", 1)[1]): p for p in trials_dir.iterdir() if "-from-" in p.name
    }
    assert 10 in exploited, sorted(p.name for p in trials_dir.iterdir())
    # Each row is its own trial's, though PBT gave one the other's last result.
    assert sorted(r["trial_id"] for r in summary["trials"]) == sorted(
        p.name for p in trials_dir.iterdir() if "-from-" not in p.name
    )
    for step, run in exploited.items():
        first = json.loads((run / "attempts.jsonl").read_text().splitlines()[0])
        assert first["resumed_from_step"] == step
    # The copy starts from trained weights: far below the bad trial's own loss.
    rows = [json.loads(line) for line in (exploited[10] / "metrics.jsonl").open()]
    assert rows[-1]["eval_loss"] < 6.0
    # ... with its own (perturbed) learning rate, not the one saved in the donor's checkpoint:
    # the cosine schedule ends at min_lr_ratio (0.1) x its peak.
    lr = yaml.safe_load((exploited[10] / "spec.yaml").read_text())["train"]["lr"]
    assert rows[-1]["step"] == 20 and rows[-1]["lr"] == pytest.approx(0.1 * lr)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, shared_prepared):
    """Ctrl-C after the first trial finished; `--resume` runs only the second one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sweep, base = sweep_of(tmp_path, shared_prepared, scheduler={"type": "fifo"})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    raw = sweep.model_dump(mode="json")
    raw["base"] = "base.yaml"
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "raygen", "tune", str(tmp_path / "sweep.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    trials = tmp_path / "sweeps" / "sweep" / "trials"
    deadline = time.time() + 300
    while time.time() < deadline and not list(trials.glob("*/result.json")):
        time.sleep(0.5)
    done_first = [p.parent.name for p in trials.glob("*/result.json")]
    assert len(done_first) == 1
    time.sleep(3)  # the second trial is starting
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=120)[0].decode()
    assert first.returncode == 130, output
    assert "--resume" in output

    again = subprocess.run([*command, "--resume"], env=env, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stdout.decode()[-3000:]
    finished = {p.parent.name for p in trials.glob("*/result.json")}
    assert len(finished) == 2
    attempts = (trials / done_first[0] / "attempts.jsonl").read_text().splitlines()
    assert len(attempts) == 1  # the finished trial was not run again
    table = pq.read_table(tmp_path / "sweeps" / "sweep" / "trials.parquet").to_pylist()
    assert sorted(r["status"] for r in table) == ["completed", "completed"]


def test_sweep_on_s3_writes_its_results_and_exports_from_there(
    ray_session, tmp_path, shared_prepared, bucket
):
    """Sweep state, trial runs, trials.parquet, best.json and the plot live in the bucket.
    The trial is a LoRA run, its rank and alpha searched; its best checkpoint exports."""
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    from raygen.cluster.storage import exists, join, read_text
    from raygen.jobs.export import export_checkpoint

    sweep, base = sweep_of(
        tmp_path,
        shared_prepared,
        search={"model.lora.r": {"grid": [4]}, "model.lora.alpha": {"choice": [12]}},
        scheduler={"type": "fifo"},
        run={"storage": f"s3://{bucket}/sweeps"},
    )
    base["train"]["max_steps"] = 10
    summary = run_sweep(sweep, base, "test")
    sweep_dir = f"s3://{bucket}/sweeps/sweep"
    assert summary["sweep_dir"] == sweep_dir
    for name in ("trials.parquet", "best.json", "metric.png", "sweep.yaml"):
        assert exists(join(sweep_dir, name)), name
    best = json.loads(read_text(join(sweep_dir, "best.json")))
    assert best["checkpoint"].startswith(f"s3://{bucket}/sweeps/sweep/trials/")
    out = export_checkpoint(best["run_dir"], best["checkpoint"], str(tmp_path / "best"))
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"
    print(sorted(p.name for p in (tmp_path / "best").rglob("*")))
    adapter = PeftConfig.from_pretrained(str(tmp_path / "best" / "adapter"))
    assert (adapter.r, adapter.lora_alpha) == (4, 12)
