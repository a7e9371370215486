"""One trial: a Tune function that runs a raygen training run (`jobs.launch.launch`) in a
thread, forwards each evaluation to Tune, and lets schedulers pause and resume it."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from raygen.cluster.storage import append_line, is_remote, join, uri_of
from raygen.jobs.spec import TrainSpec
from raygen.tuning.schedulers import PAUSING_SCHEDULERS
from raygen.tuning.spec import SweepSpec
from raygen.tuning.validate import set_key

logger = logging.getLogger(__name__)


TRIALS_DIR = "trials"
# `<trial dir name>.jsonl`: each evaluation a trial reported to Tune, in order (Tune's own
# per-trial results lose reports when PBT pauses and restarts a trial).
EVALUATIONS_DIR = "evaluations"
POINTER_FILE = "raygen_checkpoint.json"  # a Tune checkpoint: which training checkpoint


def absolute(path: str) -> str:
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def trial_spec(base_raw: dict, sweep: SweepSpec, values: dict, sweep_dir: str) -> TrainSpec:
    """A trial's train spec: the base, the searched values, and the sweep's fixed choices."""
    from raygen.jobs.validate import resolve_paths

    raw = copy.deepcopy(base_raw)
    for key, value in values.items():
        set_key(raw, key, value)
    spec = resolve_paths(TrainSpec.model_validate(raw))
    train = spec.train.model_copy(update={"checkpoint_every": spec.train.eval_every})
    run = spec.run.model_copy(update={"storage": join(sweep_dir, TRIALS_DIR)})
    data = spec.data
    if not data.prepared:
        data = data.model_copy(update={"prepared": join(sweep_dir, "data")})
    # The sweep's store, resolved by its driver (a trial's process may not see its env).
    tracking = sweep.tracking or spec.tracking
    # Each evaluation is a checkpoint, so every Tune report can be resumed or copied (PBT).
    return spec.model_copy(update={"train": train, "run": run, "data": data, "tracking": tracking})


def trial_driver(
    config: dict[str, Any],
    base_raw: dict,
    sweep_raw: dict,
    sweep_dir: str,
    datasets: dict,
    per_worker: dict[str, float],
    tracking_parent: str | None = None,
) -> None:
    """One trial (a Tune function trainable): a raygen training run reporting to Tune.

    Training runs in a thread; this function turns each of its evaluations into a Tune
    report whose checkpoint is a pointer to the training checkpoint (nothing is copied).
    """
    from ray import tune
    from ray.util.queue import Queue

    from raygen.jobs.launch import TrialHooks, launch

    sweep = SweepSpec.model_validate(sweep_raw)
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(base_raw, sweep, config, sweep_dir)
    name, resume_from = trial_id, None
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as path:
            pointer = json.loads(Path(path, POINTER_FILE).read_text())
        if pointer["trial"] != trial_id:  # PBT: continue another trial's checkpoint
            name = f"{trial_id}-from-{pointer['trial']}-{pointer['step']}"
            resume_from = pointer["checkpoint"]
        else:  # Tune restarted this trial: its own run resumes its latest checkpoint
            name = pointer["run"]
    spec = spec.model_copy(update={"name": name})

    queue: Queue = Queue(actor_options={"num_cpus": 0})
    # Schedulers that pause trials: the workers wait after each report for Tune's go-ahead.
    pausing = sweep.scheduler.type in PAUSING_SCHEDULERS
    gate: Queue | None = Queue(actor_options={"num_cpus": 0}) if pausing else None
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            hooks = TrialHooks(
                callbacks=[ReportToQueue(queue)],
                resume_from=resume_from,
                keep_best=(sweep.metric, sweep.mode),
                datasets=datasets,
                gate=gate,
                per_worker=per_worker,
                tracking_parent=tracking_parent,
            )
            outcome["result"] = launch(spec, f"trial {trial_id}", trial=hooks)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the Tune thread below
            outcome["error"] = exc
        finally:
            queue.put(None)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    run_dir = join(spec.run.storage, spec.name)
    evaluations = evaluations_log(sweep_dir, tune.get_context().get_trial_dir())
    while (item := queue.get()) is not None:
        metrics, checkpoint = item
        if metrics.get("step", 0) >= spec.train.max_steps:
            # The last report waits for the run to end (export, workers and their resources
            # released): Tune may stop the trial at it (ASHA at max_t), and stopping a trial
            # kills its Train run wherever it is, in its shutdown included, where Ray Train
            # has already stopped its placement-group cleaner but not yet removed the group.
            thread.join()
        with tempfile.TemporaryDirectory(prefix="raygen-pointer-") as tmp:
            pointer = {
                "trial": trial_id,
                "run": spec.name,
                "run_dir": run_dir,
                "step": metrics.get("step"),
                "checkpoint": uri_of(run_dir, checkpoint) if checkpoint else None,
            }
            Path(tmp, POINTER_FILE).write_text(json.dumps(pointer))
            append_line(evaluations, json.dumps({"trial_id": trial_id, **metrics}))
            tune.report(
                {**metrics, "run": spec.name, "run_dir": run_dir},
                checkpoint=tune.Checkpoint.from_directory(tmp) if checkpoint else None,
            )  # returns only when Tune wants the next result (not when it pauses or stops)
        if gate is not None:
            gate.put(True)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def evaluations_log(sweep_dir: str, trial_dir: str) -> str:
    """Where the evaluations of the trial whose Tune directory is `trial_dir` are logged."""
    return join(sweep_dir, EVALUATIONS_DIR, trial_dir.rstrip("/").rsplit("/", 1)[-1] + ".jsonl")


class ReportToQueue(UserCallback):
    """Ray Train callback (in the trial's controller): each report goes to the trial's queue."""

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        from raygen.jobs.train.metrics import PREEMPTION_CHECKPOINT

        if metrics[0].get(PREEMPTION_CHECKPOINT):
            return  # taken at a preemption notice, not at an evaluation: nothing for Tune
        numeric = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}
        self.queue.put((numeric, checkpoint.path if checkpoint else None))
