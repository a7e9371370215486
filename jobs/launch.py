"""Driver of a training run: validate the spec, prepare data, run the TorchTrainer, report."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from raygen.cluster import publish
from raygen.cluster.errors import StorageError
from raygen.cluster.storage import (
    append_line,
    is_remote,
    join,
    ray_location,
    read_text,
    uri_of,
    write_text,
)
from raygen.jobs.errors import SpecError, TrainingFailed
from raygen.jobs.progress import Report
from raygen.jobs.run_dir import (
    ATTEMPTS_FILE,
    FAILED,
    INTERRUPTIONS_FILE,
    METRICS_FILE,
    MODEL_DIR,
    PREEMPTED,
    RESULT_FILE,
    RUN_KIND,
    RUN_STATE_FILE,
    SAMPLES_DIR,
    SPEC_FILE,
    TENSORBOARD_DIR,
    check_same_data,
    check_same_run,
    copy_snapshot,
    fresh_name,
    prepared_dir_of,
    read_attempts,
    read_jsonl,
    read_result,
    record_spec,
    remove_unregistered_checkpoints,
    repair_snapshot,
    run_dir_of,
)
from raygen.jobs.spec import IMAGE_FAMILIES, TrainSpec, global_batch_size
from raygen.jobs.tracking import Tracker
from raygen.jobs.train import metrics as m
from raygen.jobs.validate import validate_train_spec

logger = logging.getLogger(__name__)


def launch(
    spec: TrainSpec,
    source: str = "spec",
    address: str | None = None,
    fresh: bool = False,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    on_data: Report | None = None,
    verbose: bool = False,
    trial: TrialHooks | None = None,
) -> dict[str, Any]:
    """Train `spec` on Ray and return the run's result (also written to `result.json`).

    Args:
        spec: the loaded spec; validated again here before Ray is asked for anything.
        source: where the spec came from, for error messages.
        address: Ray address; default `RAY_ADDRESS`, else an embedded local Ray.
        fresh: start over in a new run dir `<name>-<k>` instead of continuing `<name>`.
        on_metrics: called with each new `metrics.jsonl` row while training runs.
        on_data: hears the progress of the data preparation (`jobs.progress`).
        verbose: forward the workers' own output (DeepSpeed, Ray Train) to this process.
        trial: what a sweep trial adds (report callbacks, a checkpoint to start from).

    Raises:
        SpecError: the spec or its inputs are invalid (nothing is started).
        ClusterError: Ray is unreachable or too small.
        TrainingFailed: the run failed after it started.
    """
    timing = {"began": time.time()}  # when each start-up phase ended (see _startup)
    spec = validate_train_spec(spec, source)
    if fresh:
        spec = spec.model_copy(update={"name": fresh_name(spec)})
    run_dir = run_dir_of(spec)
    recorded = check_same_run(spec, run_dir, source)
    from raygen.jobs.data.prepare import data_fingerprint

    check_same_data(run_dir, data_fingerprint(spec), source)
    previous = read_result(run_dir)
    if (
        previous
        and previous.get("status") == "completed"
        and previous.get("final_step", 0) >= spec.train.max_steps
        and publish.state(join(run_dir, MODEL_DIR)) == "complete"
    ):
        logger.info("%s is already trained to step %s.", run_dir, previous["final_step"])
        previous = track_finished_run(spec, run_dir, previous, data_fingerprint(spec))
        return {**previous, "up_to_date": True}

    from raygen.cluster.connection import capacity_problems, connect

    embedded = connect(address, log_to_driver=verbose)
    trial = trial or TrialHooks()
    per_worker = trial.per_worker or worker_resources(spec.scaling)
    logger.info(
        "%d worker(s), each with %s%s",
        spec.scaling.num_workers,
        ", ".join(f"{amount:g} {name}" for name, amount in per_worker.items()),
        "" if spec.scaling.resources_per_worker else " (the default: the whole cluster)",
    )
    problems = capacity_problems(per_worker, spec.scaling.num_workers, embedded)
    if problems:
        raise SpecError(source, problems)

    publish.mark(run_dir, RUN_KIND)
    record_spec(run_dir, spec, recorded)
    repair_snapshot(run_dir)
    remove_unregistered_checkpoints(run_dir)

    from raygen.jobs.data.prepare import prepare_data

    prepared_dir = prepared_dir_of(spec)
    stats = prepare_data(spec, prepared_dir, report=on_data)
    write_text(
        join(run_dir, RUN_STATE_FILE),
        json.dumps({"data_fingerprint": stats["fingerprint"], "prepared": prepared_dir}, indent=2),
    )
    world = spec.scaling.num_workers
    images = spec.model.family in IMAGE_FAMILIES
    unit = "images" if images else f"sequences of {spec.data.seq_len} tokens"
    per_rank = stats["train_examples"] // world
    if per_rank < global_batch_size(spec, world) // world:
        raise SpecError(
            source,
            f"`train`: one optimizer step takes micro_batch_size x grad_accum x num_workers = "
            f"{global_batch_size(spec, world)} {unit}, but the prepared training set has only "
            f"{stats['train_examples']}; lower train.micro_batch_size or train.grad_accum"
            + ("" if images else " or data.seq_len")
            + ", or add data.",
        )
    if stats["eval_examples"] < spec.train.micro_batch_size * world:
        raise SpecError(
            source,
            f"`data`: the evaluation set has {stats['eval_examples']} {unit.split()[0]}, fewer "
            f"than one micro-batch per worker ({spec.train.micro_batch_size} x {world}); raise "
            "data.eval_fraction or lower train.micro_batch_size.",
        )

    started = time.time()
    tracker = start_tracking(spec, run_dir, stats, trial.tracking_parent)
    listeners = [f for f in (on_metrics, tracker and tracker.log_row) if f is not None]
    tail = _MetricsTail(join(run_dir, METRICS_FILE), listeners) if listeners else None
    try:
        try:
            result = _fit(spec, run_dir, prepared_dir, stats, per_worker, trial, timing)
        finally:
            if tail:
                tail.stop()
            remove_unregistered_checkpoints(run_dir)  # first: it frees room on a full disk
            repair_snapshot(run_dir)
        summary = _summarize(spec, run_dir, result, started, per_worker, timing)
        if tracker:  # the rows the tail had no time to see (an object store's last part)
            rows = m.read_metrics(join(run_dir, METRICS_FILE))
            tracker.log_rows([row for row in rows if row[m.STEP] > tracker.given_step])
    except BaseException as exc:
        if tracker:
            tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", wait_s=2)
        raise
    if tracker:
        summary["tracking"] = finish_tracking(tracker, spec, summary, stats["fingerprint"])
    try:
        write_text(join(run_dir, RESULT_FILE), json.dumps(summary, indent=2))
    except StorageError as exc:  # a full disk, say: say what happened to the run first
        if summary["status"] == "completed":
            raise
        raise TrainingFailed(
            f"Training run {spec.name} failed: {summary['error']}; and its {RESULT_FILE} "
            f"could not be written: {exc}"
        ) from None
    if summary["status"] != "completed":
        raise TrainingFailed(
            f"Training run {spec.name} failed: {summary['error']}\n"
            f"Attempts, errors and metrics are in {run_dir} ({RESULT_FILE}, {METRICS_FILE}); "
            "rerun with --verbose to see the workers' own logs."
        )
    return summary


def worker_resources(scaling: Any, runs_at_once: int = 1) -> dict[str, float]:
    """The Ray resources of each of a run's workers: `scaling.resources_per_worker`, else
    its share of the cluster when `runs_at_once` runs of this size share it (see
    `default_worker_cpus`)."""
    from raygen.cluster.connection import default_worker_cpus, node_resources

    workers = scaling.num_workers * runs_at_once
    return scaling.per_worker(default_worker_cpus(workers, scaling.use_gpu, node_resources()))


@dataclass
class TrialHooks:
    """How a sweep trial's run differs from a plain `raygen train`.

    Attributes:
        callbacks: extra Ray Train callbacks (e.g. reporting each evaluation to Tune).
        resume_from: a checkpoint (path or URI) of another run to start from (PBT).
        keep_best: keep the checkpoints with the best (metric, mode) rather than the newest
            (the newest is always kept too, for resumption).
        datasets: the prepared splits, already read into the object store by the sweep's
            driver (Ray Data reads started inside a trial would compete with the other
            trials' workers for CPUs, and can wait for one forever).
        gate: a queue the workers wait on after each report until Tune lets the trial go on
            (schedulers that pause trials; see `jobs.worker.wait_for_scheduler`).
        per_worker: each worker's resources, resolved by the sweep for all the trials it
            runs at once.
        tracking_parent: the sweep's MLflow run, under which the trial's run is nested.
    """

    callbacks: list[Any] = field(default_factory=list)
    resume_from: str | None = None
    keep_best: tuple[str, str] | None = None
    datasets: dict[str, Any] | None = None
    gate: Any = None
    per_worker: dict[str, float] | None = None
    tracking_parent: str | None = None


def start_tracking(
    spec: TrainSpec, run_dir: str, stats: dict[str, Any], parent: str | None
) -> Tracker | None:
    """Start (or continue) the run's MLflow run: its spec as parameters, what identifies it
    as tags, its spec and data stats as artifacts, and the metric rows an earlier launch
    logged but did not get into the store. None when tracking is off (or cannot start: the
    run goes on, said in a warning)."""
    from raygen.jobs.tracking import tracking_target

    target = tracking_target(spec.tracking, spec.run.storage)
    if target is None:
        return None
    try:
        return _start_tracker(spec, run_dir, stats, parent, target)
    except Exception as exc:  # noqa: BLE001 - tracking never stops a run
        logger.warning("not tracking run %s in MLflow: %s", spec.name, exc)
        return None


def _start_tracker(
    spec: TrainSpec, run_dir: str, stats: dict[str, Any], parent: str | None, target: Any
) -> Tracker:
    from importlib.metadata import version

    from raygen.jobs.data.prepare import STATS_FILE
    from raygen.jobs.tracking import KIND_TAG, TRACKING_FILE, Tracker, flatten

    tags = {
        KIND_TAG: "train",
        "raygen.version": version("raygen"),
        "raygen.run_dir": run_dir,
        "raygen.data_fingerprint": stats["fingerprint"],
    }
    params = flatten(spec.model_dump(mode="json", exclude={"tracking"}))
    tracker = Tracker(
        target, join(run_dir, TRACKING_FILE), spec.name, params, tags, parent,
        backlog=lambda: m.read_metrics(join(run_dir, METRICS_FILE)),
    )  # fmt: skip
    tracker.log_artifact(join(run_dir, SPEC_FILE))
    tracker.log_artifact(join(prepared_dir_of(spec), STATS_FILE))
    return tracker


def track_finished_run(
    spec: TrainSpec, run_dir: str, result: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    """A finished run launched again: send the store what it has not taken (the rows of a
    server that was down, or the whole run when tracking was off or went elsewhere), and
    register its model if the spec now asks to.
    Returns the result, with where it is tracked now (also written to `result.json`)."""
    from raygen.jobs.registry import registered_versions
    from raygen.jobs.tracking import TRACKING_FILE, read_record, tracking_target

    target = tracking_target(spec.tracking, spec.run.storage)
    if target is None:
        return result
    try:
        record = read_record(join(run_dir, TRACKING_FILE))
        tracked_here = record.get("run_id") and (record.get("uri"), record.get("experiment")) == (
            target.uri, target.experiment
        )  # fmt: skip
        unregistered = spec.registry is not None and spec.registry.name not in {
            v["name"] for v in registered_versions(join(run_dir, MODEL_DIR))
        }
        if tracked_here and not (result.get("tracking") or {}).get("unsent") and not unregistered:
            return result
        tracker = start_tracking(spec, run_dir, {"fingerprint": fingerprint}, None)
        if tracker is None:
            return result
        result = {**result, "tracking": finish_tracking(tracker, spec, result, fingerprint)}
        write_text(join(run_dir, RESULT_FILE), json.dumps(result, indent=2))
    except Exception as exc:  # noqa: BLE001 - the run is trained; tracking says what it lacks
        logger.warning("could not bring run %s's tracking up to date: %s", spec.name, exc)
    return result


def finish_tracking(
    tracker: Tracker, spec: TrainSpec, summary: dict[str, Any], fingerprint: str | None = None
) -> dict[str, Any]:
    """End the MLflow run with what the run produced: its status, the model's sha256, the
    sample grids; register the model when the spec says so. Returns where the run is
    tracked (and registered: `registered`, models:/NAME/VERSION) and what did not reach the
    store."""
    from raygen.jobs.tracking import STATUS_TAG

    completed = summary["status"] == "completed"
    tracker.set_tags({STATUS_TAG: summary["status"]})
    if summary["paths"].get("samples"):
        tracker.log_artifact(summary["paths"]["samples"])
    status = "FINISHED" if completed else "FAILED"
    tracker.end(status)  # before what may take long (hashing, uploading the model)
    model = summary["paths"].get("model")
    if completed and model:

        def tag_model(client: Any, run_id: str) -> None:  # hashing a large model takes a while
            from raygen.jobs.model_hash import model_sha256
            from raygen.jobs.tracking import set_tags

            sha256 = model_sha256(model)
            set_tags(client, run_id, {"raygen.model": model, "raygen.model_sha256": sha256})

        tracker.call("model sha256", tag_model)
    registered: dict[str, str] = {}
    if completed and model and spec.registry:
        name = spec.registry.name

        def register(client: Any, run_id: str) -> None:
            from raygen.jobs.registry import FINGERPRINT_TAG, register_model

            tags = {FINGERPRINT_TAG: fingerprint} if fingerprint else {}
            version = register_model(model, name, tracker.target.uri, run_id, tags)
            registered["registered"] = version.ref

        tracker.call(f"registration as {name}", register)
    report = tracker.finish(status)
    return {**report, **registered}


def _fit(
    spec: TrainSpec,
    run_dir: str,
    prepared_dir: str,
    stats: dict,
    per_worker: dict,
    trial: TrialHooks,
    timing: dict[str, float],
) -> Any:
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raygen.cluster.connection import total_resources

    if spec.model.family in IMAGE_FAMILIES:
        if spec.model.family == "vae":
            from raygen.jobs.train.vae import train_fn_per_worker
        elif spec.model.family == "gan":
            from raygen.jobs.train.gan import train_fn_per_worker
        else:
            from raygen.jobs.train.diffusion import train_fn_per_worker

        prepared = {
            "dir": prepared_dir,
            "image_shape": stats["image_shape"],
            "train_examples": stats["train_examples"],
            "eval_examples": stats["eval_examples"],
            "fid": stats.get("fid"),
            "num_classes": stats.get("num_classes", 0),
            "latent_shape": stats.get("latent_shape"),  # latent diffusion's
        }
    else:
        from raygen.jobs.train.lm import train_fn_per_worker

        prepared = {
            "tokenizer": stats["tokenizer"],
            "train_sequences": stats["train_sequences"],
            "eval_sequences": stats["eval_sequences"],
            "groups": stats.get("groups"),
            "format": stats.get("format", "text"),
        }

    options = ray.data.ExecutionOptions(preserve_order=True)  # deterministic resumption
    spare_cpus = total_resources().get("CPU", 0) - spec.scaling.num_workers * per_worker.get(
        "CPU", 0
    )
    datasets = trial.datasets or prepared_datasets(prepared_dir, stream=spare_cpus >= 1)
    storage_path, storage_filesystem = ray_location(spec.run.storage)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "run_dir": run_dir,
            "prepared": prepared,
            "start_from": trial.resume_from,
            "gate": trial.gate,
        },
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(
                max_failures=spec.run.max_failures,
                max_preemption_failures=spec.run.max_preemptions,
                preemption_grace_s=spec.run.preemption_grace_s,
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.run.keep_checkpoints,
                checkpoint_score_attribute=trial.keep_best[0] if trial.keep_best else None,
                checkpoint_score_order=trial.keep_best[1] if trial.keep_best else "max",
            ),
            callbacks=[FailureRecorder(run_dir), *trial.callbacks],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options=options,
            enable_shard_locality=False,
        ),
    )
    # Ray Train's controller checks its workers every 2 s by default, so a finished run
    # waited up to 2 s more to end; a check costs one actor call per worker.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    timing["prepared"] = time.time()
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        # Workers failed more often than run.max_failures allows: summarize, don't crash.
        try:
            checkpoint = ray.train.Result.from_path(run_dir).checkpoint
        except Exception:  # nothing registered yet: no snapshot to read
            checkpoint = None
        return _FailedRun(exc, checkpoint)


# Prepared splits up to this size (both together) are read by the driver itself straight
# into the object store: starting Ray Data's read tasks costs seconds on a small machine.
DRIVER_READ_BYTES = 256 * 2**20


def prepared_datasets(prepared_dir: str, stream: bool = True) -> dict[str, Any]:
    """The prepared `train` and `eval` splits as Ray Datasets, read the fastest way that
    fits: small splits by this process; larger ones by Ray Data's read tasks, streamed
    while training (`stream`), or read into the object store up front when no CPU is left
    beside the training workers for read tasks to run on."""
    import ray.data

    from raygen.cluster.storage import list_files, read_table

    splits = {split: join(prepared_dir, split) for split in ("train", "eval")}
    size = sum(f.size for uri in splits.values() for f in list_files(uri, ".parquet"))
    if size <= DRIVER_READ_BYTES:
        return {split: ray.data.from_arrow(read_table(uri)) for split, uri in splits.items()}
    datasets = {}
    for split, uri in splits.items():
        path, filesystem = ray_location(uri)
        datasets[split] = ray.data.read_parquet(path, filesystem=filesystem)
    if stream:
        return datasets
    # Ray Data's read tasks need a free CPU; with every CPU held by a training worker they
    # would never run, so read the shards into the object store up front.
    logger.info("No CPU left beside the workers: loading prepared data before training.")
    return {split: ds.materialize() for split, ds in datasets.items()}


class _FailedRun:
    """Stands in for Ray's Result when `fit` raised: what `_summarize` reads."""

    def __init__(self, error: BaseException, checkpoint: Any):
        self.error = error
        self.checkpoint = checkpoint


def _summarize(
    spec: TrainSpec,
    run_dir: str,
    result: Any,
    started: float,
    per_worker: dict[str, float],
    timing: dict[str, float],
) -> dict[str, Any]:
    from raygen.jobs.run_dir import step_of_checkpoint

    rows = m.read_metrics(join(run_dir, METRICS_FILE))
    final: dict[str, Any] = {}
    for row in rows:
        final.update(row)
    final.pop(m.LOGGED_AT, None)
    attempts = read_attempts(run_dir)
    checkpoint = None
    if result.checkpoint:
        checkpoint = uri_of(run_dir, result.checkpoint.path)  # Ray reports the fs's path
    error = None if result.error is None else _short_error(result.error)
    return {
        "name": spec.name,
        "status": "completed" if error is None else "failed",
        "final_step": step_of_checkpoint(checkpoint) if checkpoint else 0,
        "final_metrics": final,
        "error": error,
        "paths": {
            "run_dir": run_dir,
            "spec": join(run_dir, SPEC_FILE),
            "metrics": join(run_dir, METRICS_FILE),
            "tensorboard": join(run_dir, TENSORBOARD_DIR),
            "checkpoint": checkpoint,
            "model": join(run_dir, MODEL_DIR) if error is None else None,
            "samples": join(run_dir, SAMPLES_DIR) if spec.model.family in IMAGE_FAMILIES else None,
        },
        "resources": {"num_workers": spec.scaling.num_workers, "per_worker": per_worker},
        "attempts": attempts,
        "wall_time_s": round(time.time() - started, 1),
        "startup": _startup(attempts, timing, rows),
    }


def _startup(
    attempts: list[dict[str, Any]], timing: dict[str, float], rows: list[dict[str, Any]]
) -> dict[str, float] | None:
    """Where this launch's time went before its first logged step, in seconds: `prepare`
    (the spec, the data's fingerprint, preparing the data if needed, reading it into the
    object store), `worker_group` (Ray Train starting its worker group, until the training
    function began on rank 0), `model` (building the model and DeepSpeed's engine,
    restoring a checkpoint) and `first_log` (the steps up to the first metrics row). None
    if the run never got that far."""
    began = timing["began"]
    attempt = next((a for a in attempts if (a["launched_at"] or 0) >= began), None)
    if attempt is None or "prepared" not in timing:
        return None
    logged = [r[m.LOGGED_AT] for r in rows if r.get(m.LOGGED_AT, 0) >= attempt["started_at"]]
    if not logged:
        return None
    points = [began, timing["prepared"], attempt["launched_at"], attempt["started_at"], min(logged)]
    names = ("prepare", "worker_group", "model", "first_log")
    out = {name: round(points[i + 1] - points[i], 2) for i, name in enumerate(names)}
    return {**out, "total": round(points[-1] - began, 2)}


def _short_error(error: BaseException) -> str:
    """One line for a failure: per rank for worker-group errors, the process death first."""
    stopped = getattr(error, "controller_failure", None)
    if isinstance(stopped, RepeatedFailure):  # raygen's own decision to stop: its message
        return str(stopped)
    failures = getattr(error, "worker_failures", None)
    if failures:
        return describe_worker_failures(failures)
    return _last_line(error)


def describe_worker_failures(failures: dict[int, BaseException]) -> str:
    return "; ".join(f"rank {rank}: {_last_line(exc)}" for rank, exc in sorted(failures.items()))


def _last_line(error: BaseException) -> str:
    text = str(error)
    if "worker process has died" in text:
        # Ray's ActorDiedError: the root cause, not the survivors' broken collectives.
        return "worker process died (killed, out of memory, or crashed)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:1000] if lines else type(error).__name__


# A run that fails this many times in a row after resuming from the same checkpoint
# fails there every time: retrying again would only loop.
SAME_STEP_FAILURES = 3


class RepeatedFailure(Exception):
    """Raised by FailureRecorder to stop a run that fails at the same point every time."""


class FailureRecorder(UserCallback):
    """Ray Train callback (runs in the controller): records each worker-group failure, and
    stops a run that keeps failing at the same point (Ray Train stops a run when a
    callback raises)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.failed_from: list[int | None] = []  # per failure: the step its attempt resumed

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if checkpoint is not None:
            try:
                copy_snapshot(self.run_dir)
            except Exception as exc:  # a full disk, say: the previous copy stays
                logger.warning("could not copy the checkpoint snapshot: %s", exc)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        preempted = any(getattr(e, "preempted", False) for e in worker_exceptions.values())
        error = describe_worker_failures(worker_exceptions)[:4000]
        kind = PREEMPTED if preempted else FAILED
        record = {"at": time.time(), "kind": kind, "error": error}
        try:
            append_line(join(self.run_dir, INTERRUPTIONS_FILE), json.dumps(record))
        except Exception as exc:  # a full disk, say: the record is lost, not the run
            logger.warning("could not record the failure in %s: %s", INTERRUPTIONS_FILE, exc)
        if preempted:
            return
        attempts = read_jsonl(join(self.run_dir, ATTEMPTS_FILE))
        self.failed_from.append(attempts[-1]["resumed_from_step"] if attempts else None)
        last = self.failed_from[-SAME_STEP_FAILURES:]
        if len(last) == SAME_STEP_FAILURES and len(set(last)) == 1:
            step = last[0] or 0
            raise RepeatedFailure(
                f"stopped after {SAME_STEP_FAILURES} failures in a row, each after resuming "
                f"from step {step} and before the next checkpoint: the run fails at the same "
                f"point every time, so retrying will not help. Last error: {error}"
            )


class _MetricsTail:
    """Follows a run's metrics in a thread and hands each new row to callbacks, reading
    only what was added since the last look (the file's new bytes; a remote log's new
    parts)."""

    def __init__(self, path: str, callbacks: list[Callable[[dict[str, Any]], None]]):
        self.path, self.callbacks = path, callbacks
        self.remote = is_remote(path)
        self.seen_step = max((r[m.STEP] for r in m.read_metrics(path)), default=0)
        self.offset = 0 if self.remote else _size(path)
        self.last_part = (m.metric_parts(path) or [""])[-1].rsplit("/", 1)[-1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._poll()
        self._poll()

    def _poll(self) -> None:
        try:
            records = self._new_records()
        except Exception as exc:  # progress display only: the run goes on
            logger.debug("could not read new metrics: %s", exc)
            return
        for record in records:
            if m.RESUMED_FROM in record:  # a restart dropped the rows after its checkpoint
                self.seen_step = min(self.seen_step, record[m.RESUMED_FROM])
            elif m.STEP in record and record[m.STEP] > self.seen_step:
                for callback in self.callbacks:
                    callback(record)
                self.seen_step = record[m.STEP]

    def _new_records(self) -> list[dict[str, Any]]:
        if self.remote:
            records: list[dict[str, Any]] = []
            for part in m.metric_parts(self.path, after=self.last_part):
                records += m.metric_rows(read_text(part))
                self.last_part = part.rsplit("/", 1)[-1]
            return records
        size = _size(self.path)
        if size < self.offset:  # rewritten by a restart: it kept the rows up to its step
            kept = m.metric_rows(Path(self.path).read_text())
            self.offset = 0
            return [{m.RESUMED_FROM: max((r[m.STEP] for r in kept), default=0)}]
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        self.offset += len(complete)
        return m.metric_rows(complete.decode())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0
