"""Driver of a sweep: validate, prepare data once, run the trials with Ray Tune, summarize.

Every trial is a raygen training run (`jobs.launch.launch`) started by a tiny Tune driver
function; its TorchTrainer reports each evaluation back to Tune, so schedulers stop bad
trials early. Trials live in `<storage>/<sweep>/trials/<trial id>`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import yaml
from ray.tune import Callback

from raygen.cluster.errors import StorageError
from raygen.cluster.storage import exists, join, list_files, ray_location, read_text, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.progress import Report
from raygen.jobs.spec import TrackingSpec, TrainSpec
from raygen.jobs.tracking import (
    KIND_TAG,
    PARENT_RUN_TAG,
    STATUS_TAG,
    TRACKING_FILE,
    Tracker,
    flatten,
    read_record,
    set_tags,
    tracking_target,
)
from raygen.tuning.errors import SweepInterrupted, SweepStalled
from raygen.tuning.resources import Resources
from raygen.tuning.results import BEST_FILE, PLOT_FILE, TRIALS_FILE, summarize
from raygen.tuning.schedulers import build_scheduler, param_space, trials_that_fit
from raygen.tuning.spec import SweepSpec
from raygen.tuning.trial import TRIALS_DIR, absolute, trial_driver, trial_spec
from raygen.tuning.validate import evaluations_of, sweep_problems

logger = logging.getLogger(__name__)

# A trial's driver only waits; its workers hold the real CPUs. (Not 0: Tune needs a
# resource to place the trial by.)
DRIVER_CPU = 0.01

SWEEP_SPEC_FILE = "sweep.yaml"


def run_sweep(
    sweep: SweepSpec,
    base_raw: dict,
    source: str = "sweep",
    address: str | None = None,
    resume: bool = False,
    on_progress: Callable[[str], None] | None = None,
    on_trials: Callable[[int, int], None] | None = None,
    on_data: Report | None = None,
) -> dict[str, Any]:
    """Run (or with `resume`, continue) the sweep; returns its summary (also `best.json`).
    `on_data` hears the progress of its data preparation (`jobs.progress`).

    Raises:
        SpecError: the sweep or its base spec is invalid (nothing is started), or every
            trial failed.
    """
    problems = sweep_problems(sweep, base_raw, source)
    if problems:
        raise SpecError(source, problems)
    sweep_dir = join(absolute(sweep.run.storage), sweep.name)
    started = exists(join(sweep_dir, "tuner.pkl"))
    if resume and not started:
        raise SpecError(
            source, f"--resume: no sweep to continue at {sweep_dir}; run it without --resume."
        )
    if started and not resume:
        raise SpecError(
            source,
            f"`name`: a sweep {sweep.name!r} already ran in {sweep_dir} (results in "
            f"{BEST_FILE}, {TRIALS_FILE}); continue it with --resume, or start another with "
            f"--set name={sweep.name}-2.",
        )

    from ray import tune

    from raygen.cluster.connection import connect, total_resources
    from raygen.jobs.data.prepare import prepare_data
    from raygen.jobs.launch import prepared_datasets, worker_resources

    connect(address)
    sweep = sweep.model_copy(update={"tracking": resolved_tracking(sweep, base_raw)})
    base = trial_spec(base_raw, sweep, {}, sweep_dir)
    # Prepared and read once: every trial trains on these blocks in the object store.
    prepare_data(base, base.data.prepared, report=on_data)
    datasets = prepared_datasets(base.data.prepared, stream=False)
    write_text(join(sweep_dir, SWEEP_SPEC_FILE), yaml.safe_dump(sweep.model_dump(mode="json")))

    at_once = sweep.max_concurrent_trials or trials_that_fit(base, total_resources())
    # The trials running at once share the cluster as one run's workers would; by default
    # each worker leaves its trial's driver the CPU fraction it holds.
    per_worker = worker_resources(base.scaling, runs_at_once=at_once)
    if not base.scaling.resources_per_worker:
        per_worker["CPU"] -= DRIVER_CPU
    tracker = start_sweep_tracking(sweep, sweep_dir)
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver, base_raw=base_raw, sweep_raw=sweep.model_dump(mode="json"),
            sweep_dir=sweep_dir, datasets=datasets, per_worker=per_worker,
            tracking_parent=tracker.wait_started(PARENT_WAIT_S) if tracker else None,
        ),
        {"cpu": DRIVER_CPU},
    )  # fmt: skip
    resources = Resources(sweep.run.pending_timeout_s)
    storage_path, storage_filesystem = ray_location(absolute(sweep.run.storage))
    run_config = tune.RunConfig(
        name=sweep.name,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=tune.FailureConfig(max_failures=sweep.run.max_failures),
        callbacks=[
            resources,
            *(
                [_Progress(sweep, on_progress, evaluations_of(base), on_trials)]
                if on_progress
                else []
            ),
        ],
        stop=resources,
        verbose=0,
    )
    if resume:
        tuner = tune.Tuner.restore(
            ray_location(sweep_dir)[0], trainable=trainable, resume_errored=True,
            storage_filesystem=ray_location(sweep_dir)[1],
        )  # fmt: skip
    else:
        # Tune ignores max_concurrent_trials next to a generator: limit it here.
        generator = tune.search.BasicVariantGenerator(
            random_state=sweep.seed, max_concurrent=at_once
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                scheduler=build_scheduler(sweep, base, generator, at_once),
                search_alg=generator,
            ),
            run_config=run_config,
        )
    try:
        try:
            results = tuner.fit()
        finally:
            resources.release_all()
        if resources.stalled:
            raise SweepStalled(resources.stalled)
        unfinished = _unfinished_trials(sweep_dir)
        if unfinished:
            raise SweepInterrupted(
                f"sweep {sweep.name} interrupted with {len(unfinished)} trial(s) unfinished; "
                f"its state is saved in {sweep_dir}. Continue it with: raygen tune {source} "
                "--resume"
            )
        summary = summarize(sweep, base, results, sweep_dir, source)
    except BaseException as exc:
        if tracker:
            tracker.finish("KILLED" if isinstance(exc, SweepInterrupted) else "FAILED", wait_s=2)
        raise
    if tracker:
        summary["tracking"] = finish_sweep_tracking(tracker, sweep, sweep_dir, summary)
    return summary


# How a trial's MLflow run ends when the trial did not end it: by how the trial ended.
RUN_END = {
    "completed": "FINISHED", "errored": "FAILED", "stopped_early": "KILLED", "replaced": "KILLED"
}  # fmt: skip

# How long a sweep waits for its parent MLflow run before starting trials without one (a
# tracking server that is down must not hold the sweep up; its trials are nested at the end).
PARENT_WAIT_S = 10.0


def resolved_tracking(sweep: SweepSpec, base_raw: dict) -> TrackingSpec:
    """The sweep's tracking with its store resolved here, in the driver: the trials' runs
    and the sweep's parent run go to one store (the embedded one under the sweep's
    storage, unless a URI is given)."""
    tracking = sweep.tracking or TrainSpec.model_validate(base_raw).tracking
    target = tracking_target(tracking, absolute(sweep.run.storage))
    if target is None:
        return TrackingSpec(mlflow=False)
    return TrackingSpec(
        mlflow={"uri": target.uri, "experiment": target.experiment, "timeout_s": target.timeout_s}
    )


def start_sweep_tracking(sweep: SweepSpec, sweep_dir: str) -> Tracker | None:
    """The sweep's parent MLflow run (continued on --resume): the sweep spec as parameters."""
    from importlib.metadata import version

    assert sweep.tracking is not None  # resolved by run_sweep
    target = tracking_target(sweep.tracking, sweep_dir)
    if target is None:
        return None
    params = flatten(sweep.model_dump(mode="json", exclude={"tracking"}))
    tags = {KIND_TAG: "sweep", "raygen.version": version("raygen"), "raygen.sweep_dir": sweep_dir}
    try:
        return Tracker(target, join(sweep_dir, TRACKING_FILE), sweep.name, params, tags)
    except Exception as exc:  # noqa: BLE001 - tracking never stops a sweep
        logger.warning("not tracking sweep %s in MLflow: %s", sweep.name, exc)
        return None


def finish_sweep_tracking(
    tracker: Tracker, sweep: SweepSpec, sweep_dir: str, summary: dict[str, Any]
) -> dict[str, Any]:
    """End the parent run with the sweep's results (best value, `trials.parquet`,
    `best.json`, the metric plot) and mark each trial's run with how its trial ended."""
    from mlflow.entities import Metric

    best = summary["best"]
    tracker.call(
        "best value",
        lambda c, run_id: c.log_batch(
            run_id, metrics=[Metric(f"best_{sweep.metric}", best["value"], 0, 0)]
        ),
    )
    tracker.set_tags({"raygen.best_trial": best["trial_id"], STATUS_TAG: "completed"})
    for name in (TRIALS_FILE, BEST_FILE, PLOT_FILE):
        tracker.log_artifact(join(sweep_dir, name))
    status = {row["trial_id"]: row["status"] for row in summary["trials"]}
    children = {}  # MLflow run id -> its trial's status
    try:
        entries = list_files(join(sweep_dir, TRIALS_DIR), TRACKING_FILE)
    except StorageError as exc:
        logger.warning("could not list the trials' MLflow runs: %s", exc)
        entries = []
    latest: dict[str, tuple[int, str]] = {}  # trial -> the step its last run started at
    for entry in entries:
        record = read_record(entry.uri)
        run_name = entry.uri.rsplit("/", 2)[-2]
        trial = run_name.split("-from-", 1)[0]  # PBT: `<trial>-from-<donor>-<step>`
        start = int(run_name.rsplit("-", 1)[1]) if "-from-" in run_name else 0
        if record.get("uri") == tracker.target.uri and record.get("run_id"):
            children[record["run_id"]] = status.get(trial, "unknown")
            if start >= latest.get(trial, (-1, ""))[0]:
                latest[trial] = (start, record["run_id"])
    # A run PBT replaced by a copy of another trial's did not end as its trial did.
    final = {run_id for _, run_id in latest.values()}
    children = {r: s if r in final else "replaced" for r, s in children.items()}

    def mark_trials(client: Any, parent: str) -> None:
        for run_id, trial_status in children.items():
            try:
                set_tags(client, run_id, {STATUS_TAG: trial_status, PARENT_RUN_TAG: parent})
                # A trial Tune stopped (early, or to restart it from another's checkpoint)
                # ended its run as failed, or not at all.
                ended = client.get_run(run_id).info.status
                if trial_status in ("stopped_early", "replaced") or ended == "RUNNING":
                    client.set_terminated(run_id, RUN_END.get(trial_status, "KILLED"))
            except Exception as exc:  # noqa: BLE001 - one trial's run: the others go on
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning("trial run %s is not in the store: %s", run_id, exc)

    tracker.call("trial statuses", mark_trials)
    return tracker.finish("FINISHED")


def _unfinished_trials(sweep_dir: str) -> list[str]:
    """Trials the saved experiment state has not finished (Ctrl-C stopped the sweep).

    After an interruption Tune reports the stopped trials as terminated; only the state it
    saved for `Tuner.restore` still says they were running.
    """
    from raygen.cluster.storage import list_files

    states = [
        f.uri
        for f in list_files(sweep_dir, ".json")
        if f.uri.rsplit("/", 1)[-1].startswith("experiment_state-")
        and f.uri.rsplit("/", 1)[0].rstrip("/") == sweep_dir.rstrip("/")
    ]
    if not states:
        return []
    state = json.loads(read_text(max(states)) or "{}")
    trials = [json.loads(entry[0]) for entry in state.get("trial_data", [])]
    return [t["trial_id"] for t in trials if t.get("status") in ("PENDING", "RUNNING", "PAUSED")]


# --- the trial -----------------------------------------------------------------------------


# --- results ---------------------------------------------------------------------------------


class _Progress(Callback):
    """Tune callback: one line per trial event, with the current best."""

    def __init__(
        self,
        sweep: SweepSpec,
        emit: Callable[[str], None],
        evaluations: int,
        on_trials: Callable[[int, int], None] | None = None,
    ):
        self.sweep, self.emit, self.evaluations = sweep, emit, evaluations
        self.on_trials = on_trials
        self.best: tuple[float, str] | None = None
        self.counts = {"running": 0, "completed": 0, "stopped early": 0, "errored": 0}
        self.total = sweep.trials()
        if on_trials:
            on_trials(0, self.total)

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment; a console printer does not pickle,
        # so a restored sweep reports progress through the logger.
        return {**self.__dict__, "emit": logger.info, "on_trials": None}

    def _ended(self) -> None:
        if self.on_trials:
            done = sum(n for k, n in self.counts.items() if k != "running")
            self.on_trials(done, self.total)

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best[0] if self.sweep.mode == "min" else value > self.best[0]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.counts["running"] += 1
        self.emit(f"trial {trial.trial_id} started: {self._config(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        value = result.get(self.sweep.metric)
        if value is None:
            return
        if self._better(value):
            self.best = (value, trial.trial_id)
        self.emit(
            f"trial {trial.trial_id} step {result.get('step')}: {self.sweep.metric} "
            f"{value:.4f}  (best {self.best[0]:.4f} by {self.best[1]})"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reports = (trial.last_result or {}).get("training_iteration", 0)
        outcome = "completed" if reports >= self.evaluations else "stopped early"
        self.counts["running"] -= 1
        self.counts[outcome] += 1
        self.emit(f"trial {trial.trial_id} {outcome}  [{self._status()}]")
        self._ended()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.counts["running"] -= 1
        self.counts["errored"] += 1
        self.emit(f"trial {trial.trial_id} errored  [{self._status()}]")
        self._ended()

    def _status(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in self.counts.items())

    def _config(self, trial: Any) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
