"""Driver of a sweep: validate, prepare data once, run the trials with Ray Tune, summarize.

Every trial is a raygen training run (`jobs.launch.launch`) started by a tiny Tune driver
function; its TorchTrainer reports each evaluation back to Tune, so schedulers stop bad
trials early. Trials live in `<storage>/<sweep>/trials/<trial id>`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.train import UserCallback
from ray.tune import Callback
from ray.tune.stopper import Stopper

from raygen.cluster.storage import exists, is_remote, join, read_text, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.loader import check_key_path, load_spec, validate_spec
from raygen.jobs.spec import TrainSpec
from raygen.tuning.errors import SweepInterrupted, SweepStalled
from raygen.tuning.halving import SuccessiveHalving, rungs
from raygen.tuning.spec import SweepSpec

logger = logging.getLogger(__name__)

TRIALS_DIR = "trials"
TRIALS_FILE = "trials.parquet"
BEST_FILE = "best.json"
PLOT_FILE = "metric.png"
SWEEP_SPEC_FILE = "sweep.yaml"
PAUSING_SCHEDULERS = ("successive_halving", "pbt")
POINTER_FILE = "raygen_checkpoint.json"  # a Tune checkpoint: which training checkpoint
# Keys a sweep may not search: where and how big a trial runs, and the data, which is
# prepared and read once for all trials.
FIXED_KEYS = ("name", "run", "scaling", "data", "tokenizer")
# Metrics each model family logs at every evaluation.
EVAL_METRICS = {"causal-lm": ("eval_loss", "perplexity"), "diffusion": ("eval_loss", "fid")}


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, dict]:
    """The sweep spec and its base train spec (as a raw dict with the sweep's overrides).

    Raises:
        SpecError: either file is missing or invalid, or a key is not a train-spec key.
    """
    sweep = load_spec(SweepSpec, path, overrides)
    base_path = Path(path).parent / sweep.base
    source = str(path)
    if not base_path.is_file():
        raise SpecError(source, f"`base`: {base_path} does not exist; give a train spec path.")
    base_raw = yaml.safe_load(base_path.read_text()) or {}
    problems = []
    for section, keys in (("overrides", sweep.overrides), ("search", sweep.search)):
        for key in keys:
            problem = check_key_path(TrainSpec, key.split("."))
            if problem:
                problems.append(f"`{section}.{key}`: not a train-spec key: {problem}")
            elif section == "search" and any(
                key == fixed or key.startswith(fixed + ".") for fixed in FIXED_KEYS
            ):
                problems.append(
                    f"`search.{key}`: cannot be searched: every trial shares the sections "
                    f"{', '.join(FIXED_KEYS)} (the data is prepared and read once for all "
                    "trials); set it in the base spec or overrides."
                )
    if problems:
        raise SpecError(source, problems)
    for key, value in sweep.overrides.items():
        set_key(base_raw, key, value)
    return sweep, base_raw


def sweep_problems(sweep: SweepSpec, base_raw: dict, source: str) -> list[str]:
    """Everything wrong with a sweep found without Ray: each searched value is tried."""
    from raygen.jobs.validate import resolve_paths, spec_problems

    problems = []
    for key, domain in sweep.search.items():
        for value in domain.values_to_check():
            raw = copy.deepcopy(base_raw)
            set_key(raw, key, value)
            try:
                validate_spec(TrainSpec, raw, source)
            except SpecError as exc:
                problems += [f"`search.{key}` = {value!r}: {p}" for p in exc.problems]
    if problems:
        return problems
    trial = copy.deepcopy(base_raw)
    for key, domain in sweep.search.items():
        set_key(trial, key, domain.values_to_check()[0])
    try:
        spec = resolve_paths(validate_spec(TrainSpec, trial, source))
    except SpecError as exc:
        return exc.problems
    problems += spec_problems(spec)
    known = EVAL_METRICS[spec.model.family]
    if sweep.metric not in known:
        problems.append(
            f"`metric`: {sweep.metric!r} is not logged at eval steps of a "
            f"{spec.model.family} run; use one of {', '.join(known)}."
        )
    s = sweep.scheduler
    if s.type == "successive_halving" and not _milestones(s, spec):
        problems.append(
            f"`scheduler.grace_period`: {s.grace_period} evaluations leave no rung below the "
            f"trial's {s.max_t or evaluations_of(spec)} (max_t, or max_steps / eval_every): "
            "successive halving would stop nothing; lower grace_period or use fifo."
        )
    if sweep.metric == "fid" and spec.sampling.fid_extractor == "none":
        problems.append("`metric`: fid needs sampling.fid_extractor (classifier or inception).")
    return problems


def evaluations_of(spec: TrainSpec) -> int:
    """Evaluations (Tune reports) in a full trial: every eval_every steps and the last."""
    return math.ceil(spec.train.max_steps / spec.train.eval_every)


def run_sweep(
    sweep: SweepSpec,
    base_raw: dict,
    source: str = "sweep",
    address: str | None = None,
    resume: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or with `resume`, continue) the sweep; returns its summary (also `best.json`).

    Raises:
        SpecError: the sweep or its base spec is invalid (nothing is started), or every
            trial failed.
    """
    problems = sweep_problems(sweep, base_raw, source)
    if problems:
        raise SpecError(source, problems)
    sweep_dir = join(_absolute(sweep.run.storage), sweep.name)
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

    import ray.data
    from ray import tune

    from raygen.cluster.connection import connect, total_resources
    from raygen.jobs.data.prepare import prepare_data

    connect(address)
    base = _trial_spec(base_raw, sweep, {}, sweep_dir)
    # Prepared and read once: every trial trains on these blocks in the object store.
    prepare_data(base, base.data.prepared)
    datasets = {
        split: ray.data.read_parquet(join(base.data.prepared, split)).materialize()
        for split in ("train", "eval")
    }
    write_text(join(sweep_dir, SWEEP_SPEC_FILE), yaml.safe_dump(sweep.model_dump(mode="json")))

    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver, base_raw=base_raw, sweep_raw=sweep.model_dump(mode="json"),
            sweep_dir=sweep_dir, datasets=datasets,
        ),
        {"cpu": 0.01},  # the driver only waits; its trial's workers hold the real CPUs
    )  # fmt: skip
    resources = _Resources(sweep.run.pending_timeout_s)
    run_config = tune.RunConfig(
        name=sweep.name,
        storage_path=_absolute(sweep.run.storage),
        failure_config=tune.FailureConfig(max_failures=sweep.run.max_failures),
        callbacks=[
            resources,
            *([_Progress(sweep, on_progress, evaluations_of(base))] if on_progress else []),
        ],
        stop=resources,
        verbose=0,
    )
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
    else:
        at_once = sweep.max_concurrent_trials or _trials_that_fit(base, total_resources())
        # Tune ignores max_concurrent_trials next to a generator: limit it here.
        generator = tune.search.BasicVariantGenerator(
            random_state=sweep.seed, max_concurrent=at_once
        )
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                scheduler=_scheduler(sweep, base, generator, at_once),
                search_alg=generator,
            ),
            run_config=run_config,
        )
    try:
        results = tuner.fit()
    finally:
        resources.release_all()
    if resources.stalled:
        raise SweepStalled(resources.stalled)
    unfinished = _unfinished_trials(sweep_dir)
    if unfinished:
        raise SweepInterrupted(
            f"sweep {sweep.name} interrupted with {len(unfinished)} trial(s) unfinished; its "
            f"state is saved in {sweep_dir}. Continue it with: raygen tune {source} --resume"
        )
    return summarize(sweep, base, results, sweep_dir, source)


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


def _absolute(path: str) -> str:
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def _trial_spec(base_raw: dict, sweep: SweepSpec, values: dict, sweep_dir: str) -> TrainSpec:
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
    # Each evaluation is a checkpoint, so every Tune report can be resumed or copied (PBT).
    return spec.model_copy(update={"train": train, "run": run, "data": data})


def _param_space(sweep: SweepSpec, grids_as_choices: bool = False) -> dict[str, Any]:
    """Tune domains of the searched keys (PBT mutates over grids as choices)."""
    from ray import tune

    make = {
        "choice": tune.choice,
        "uniform": lambda b: tune.uniform(*b),
        "loguniform": lambda b: tune.loguniform(*b),
        "randint": lambda b: tune.randint(*b),
        "grid": tune.choice if grids_as_choices else tune.grid_search,
    }
    return {key: make[d.kind](getattr(d, d.kind)) for key, d in sweep.search.items()}


def _scheduler(sweep: SweepSpec, base: TrainSpec, generator: Any, at_once: int) -> Any:
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )

    s = sweep.scheduler
    if s.type == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=s.max_t or evaluations_of(base),
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.type == "successive_halving":
        return SuccessiveHalving(
            generator,
            trials=sweep.trials(),
            milestones=_milestones(s, base),
            reduction_factor=s.reduction_factor,
            max_running=at_once,
            metric=sweep.metric,
            mode=sweep.mode,
        )
    if s.type == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=s.grace_period, min_samples_required=2
        )
    if s.type == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=_param_space(sweep, grids_as_choices=True),
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            synch=s.synch,
        )
    return FIFOScheduler()


def _milestones(s: Any, base: TrainSpec) -> list[int]:
    return rungs(s.grace_period, s.reduction_factor, s.max_t or evaluations_of(base))


def _trials_that_fit(spec: TrainSpec, resources: dict[str, float]) -> int:
    """Trials the cluster's CPUs and GPUs can run at once (at least 1)."""
    per_worker = spec.scaling.per_worker()
    fits = [
        int(resources.get(name, 0) // (amount * spec.scaling.num_workers))
        for name, amount in per_worker.items()
        if amount > 0
    ]
    return max(1, min(fits) if fits else 1)


# --- the trial -----------------------------------------------------------------------------


def trial_driver(
    config: dict[str, Any], base_raw: dict, sweep_raw: dict, sweep_dir: str, datasets: dict
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
    spec = _trial_spec(base_raw, sweep, config, sweep_dir)
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
            )
            outcome["result"] = launch(spec, f"trial {trial_id}", trial=hooks)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the Tune thread below
            outcome["error"] = exc
        finally:
            queue.put(None)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    run_dir = join(spec.run.storage, spec.name)
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
                "checkpoint": _with_scheme(checkpoint, run_dir) if checkpoint else None,
            }
            Path(tmp, POINTER_FILE).write_text(json.dumps(pointer))
            tune.report(
                {**metrics, "run": spec.name, "run_dir": run_dir},
                checkpoint=tune.Checkpoint.from_directory(tmp) if checkpoint else None,
            )  # returns only when Tune wants the next result (not when it pauses or stops)
        if gate is not None:
            gate.put(True)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def _with_scheme(path: str, run_dir: str) -> str:
    """Ray reports paths inside the filesystem; put the URI scheme back for object stores."""
    if is_remote(run_dir) and "://" not in path:
        return run_dir.split("://", 1)[0] + "://" + path
    return path


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


# --- results ---------------------------------------------------------------------------------


def summarize(
    sweep: SweepSpec, base: TrainSpec, results: Any, sweep_dir: str, source: str
) -> dict[str, Any]:
    """Write `trials.parquet`, `best.json` and the metric plot; return the summary."""
    import pyarrow as pa

    expected = evaluations_of(base)
    rows, curves = [], {}
    for result in results:
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        values = (
            history[sweep.metric].dropna().tolist()
            if history is not None and sweep.metric in history
            else []
        )
        steps = history["step"].tolist() if values else []
        curves[trial_id] = (steps, values)
        iterations = len(values)
        if result.error is not None:
            status = "errored"
        elif iterations < expected:
            status = "stopped_early"
        else:
            status = "completed"
        best_value = (min if sweep.mode == "min" else max)(values) if values else None
        checkpoint = _best_pointer(result, sweep)
        row = {
            "trial_id": trial_id,
            "status": status,
            "iterations": iterations,
            f"best_{sweep.metric}": best_value,
            f"last_{sweep.metric}": values[-1] if values else None,
            "checkpoint": checkpoint["checkpoint"] if checkpoint else None,
            "run_dir": checkpoint["run_dir"] if checkpoint else None,
            "error": _one_line(result.error) if result.error is not None else None,
        }
        for key in sweep.search:
            row[f"config.{key}"] = (result.config or {}).get(key)
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    table = pa.Table.from_pylist(rows)
    _write_table(table, join(sweep_dir, TRIALS_FILE))
    _plot(curves, sweep, join(sweep_dir, PLOT_FILE))

    scored = [r for r in rows if r[f"best_{sweep.metric}"] is not None and r["checkpoint"]]
    if not scored:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])
        raise SpecError(source, f"every trial failed ({errors or 'no evaluation reported'}).")
    pick = min if sweep.mode == "min" else max
    best = pick(scored, key=lambda r: r[f"best_{sweep.metric}"])
    best_spec = read_text(join(best["run_dir"], "spec.yaml"))
    summary = {
        "trial_id": best["trial_id"],
        "metric": sweep.metric,
        "mode": sweep.mode,
        "value": best[f"best_{sweep.metric}"],
        "checkpoint": best["checkpoint"],
        "run_dir": best["run_dir"],
        "config": {k: best[f"config.{k}"] for k in sweep.search},
        "spec": yaml.safe_load(best_spec) if best_spec else None,
    }
    write_text(join(sweep_dir, BEST_FILE), json.dumps(summary, indent=2))
    return {
        "sweep_dir": sweep_dir,
        "best": summary,
        "trials": rows,
        "paths": {
            "trials": join(sweep_dir, TRIALS_FILE),
            "best": join(sweep_dir, BEST_FILE),
            "plot": join(sweep_dir, PLOT_FILE),
        },
    }


def _best_pointer(result: Any, sweep: SweepSpec) -> dict | None:
    """The pointer of the trial's checkpoint with the best metric (None: no checkpoint)."""
    try:
        checkpoint = result.get_best_checkpoint(sweep.metric, sweep.mode)
    except Exception:  # noqa: BLE001 - Ray raises when a trial reported no checkpoint
        checkpoint = None
    checkpoint = checkpoint or result.checkpoint
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return json.loads(Path(path, POINTER_FILE).read_text())


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _write_table(table: Any, uri: str) -> None:
    import pyarrow.parquet as pq

    from raygen.cluster.storage import resolve

    fs, path = resolve(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, filesystem=fs)


def _plot(curves: dict[str, tuple[list, list]], sweep: SweepSpec, uri: str) -> None:
    """The metric over training steps, one line per trial; early-stopped lines end early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for trial_id, (steps, values) in sorted(curves.items()):
        if values:
            axes.plot(steps, values, marker="o", markersize=3, label=trial_id)
    axes.set_xlabel("step")
    axes.set_ylabel(sweep.metric)
    axes.set_title(f"{sweep.name}: {sweep.metric} of every trial ({sweep.scheduler.type})")
    axes.grid(alpha=0.3)
    if len(curves) <= 12:
        axes.legend(fontsize=7)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, PLOT_FILE)
        figure.savefig(local, dpi=110, bbox_inches="tight")
        plt.close(figure)
        if is_remote(uri):
            from raygen.cluster.storage import upload_file

            upload_file(str(local), uri)
        else:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            local.replace(uri)


class _Resources(Callback, Stopper):
    """Tune callback and stopper: every resource of a trial that is not running (stopped,
    errored, paused) is released, and a sweep whose trials cannot get resources says so.

    Ray Train removes a run's placement group when the run ends, also when it is killed (a
    cleaner actor watches it), but only once its worker group has started: a run killed
    while its group was pending or starting leaves the group behind, and once the group is
    placed it holds resources no actor uses, which the next trial waits for forever. So a
    placement group created during the sweep that is placed but has no live actor in it
    for RELEASE_GRACE_S is removed here (a live trial or worker group has its actors in its
    group within seconds). Placement groups pending for long are reported with what they
    ask for and what the cluster has, and past `pending_timeout_s` the sweep stops.
    """

    RELEASE_GRACE_S = 20.0
    PENDING_WARN_S = 60.0
    CHECK_EVERY_S = 2.0

    def __init__(self, pending_timeout_s: float):
        self.pending_timeout_s = pending_timeout_s
        self.stalled: str | None = None  # why the sweep must stop (Tune stops its trials)
        self.before = {g.placement_group_id for g in _placement_groups()}  # not the sweep's
        self.unused_since: dict[str, float] = {}
        self.removed: list[str] = []
        self.pending_since: dict[str, float] = {}
        self.warned: set[str] = set()
        self.checked = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "unused_since": {}, "pending_since": {}}

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.stalled is not None

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.checked < self.CHECK_EVERY_S:
            return
        self.checked = now
        try:
            groups = _placement_groups()
            self._release_unused(groups, now)
            self._watch_pending(groups, now)
        except Exception as exc:  # a check that cannot run must not stop the sweep
            logger.debug("resource check skipped: %s", exc)

    def _release_unused(self, groups: list, now: float) -> None:
        from ray.util.state import list_actors

        placed = [
            g for g in groups if g.state == "CREATED" and g.placement_group_id not in self.before
        ]
        if not placed:
            self.unused_since.clear()
            return
        alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
        used = {a.placement_group_id for a in alive if a.placement_group_id}
        unused = {g.placement_group_id: g for g in placed if g.placement_group_id not in used}
        self.unused_since = {k: v for k, v in self.unused_since.items() if k in unused}
        for group_id, group in unused.items():
            if now - self.unused_since.setdefault(group_id, now) < self.RELEASE_GRACE_S:
                continue
            asks = [b.get("unit_resources") for b in group.bundles or []]
            logger.warning(
                "placement group %s holds %s and no actor runs in it (its trial's run was "
                "stopped while it started); removing it",
                group_id,
                asks,
            )
            _remove_group(group_id)
            self.removed.append(group_id)

    def _watch_pending(self, groups: list, now: float) -> None:
        pending = [g for g in groups if g.state == "PENDING"]
        ids = {p.placement_group_id for p in pending}
        self.pending_since = {k: v for k, v in self.pending_since.items() if k in ids}
        for group in pending:
            waited = now - self.pending_since.setdefault(group.placement_group_id, now)
            if waited < self.PENDING_WARN_S and waited < self.pending_timeout_s:
                continue
            asks = [b.get("unit_resources") for b in group.bundles or []]
            available = _plain_resources(ray.available_resources())
            message = (
                f"a trial's workers have waited {waited:.0f} s for resources {asks}; the "
                f"cluster has {available} free of {_cluster_resources()}"
            )
            if waited >= self.pending_timeout_s:
                self.stalled = (
                    f"{message}. Stopped after run.pending_timeout_s "
                    f"({self.pending_timeout_s:g} s): lower max_concurrent_trials or the "
                    "workers' resources, or add nodes."
                )
            if group.placement_group_id not in self.warned:
                self.warned.add(group.placement_group_id)
                logger.warning("%s; still waiting", message)

    def release_all(self, timeout_s: float = 30.0, settle_s: float = 8.0) -> None:
        """Once Tune is done: wait for the trials' Train runs to end, then remove every
        placement group the sweep created that is still there (nothing will use it). A run
        killed while it asked for a group can have the request land a moment after it died:
        the sweep's groups are looked for again until none has come for `settle_s`."""
        from ray.util.state import list_actors

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = list_actors(
                filters=[("state", "=", "ALIVE"), ("class_name", "=", "TrainController")]
            )
            if not alive:
                break
            time.sleep(0.5)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle_s and time.monotonic() < deadline + settle_s:
            left = [
                g.placement_group_id
                for g in _placement_groups()
                if g.state != "REMOVED" and g.placement_group_id not in self.before
            ]
            for group_id in left:
                _remove_group(group_id)
            if left:
                quiet_since = time.monotonic()
            time.sleep(1.0)


def _placement_groups() -> list:
    """This driver's job's placement groups (other jobs' are not the sweep's business)."""
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    groups = list_placement_groups(detail=True, limit=10_000)
    return [g for g in groups if g.creator_job_id == job]


def _remove_group(group_id: str) -> None:
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def _cluster_resources() -> dict[str, float]:
    return _plain_resources(ray.cluster_resources())


def _plain_resources(resources: dict[str, float]) -> dict[str, float]:
    """CPUs, GPUs and custom resources, without Ray's bookkeeping (memory, node and
    placement-group resources)."""
    return {
        k: round(v, 2)
        for k, v in resources.items()
        if not k.startswith(("node:", "memory", "object_store", "bundle_group_"))
        and "_group_" not in k
    }


class _Progress(Callback):
    """Tune callback: one line per trial event, with the current best."""

    def __init__(self, sweep: SweepSpec, emit: Callable[[str], None], evaluations: int):
        self.sweep, self.emit, self.evaluations = sweep, emit, evaluations
        self.best: tuple[float, str] | None = None
        self.counts = {"running": 0, "completed": 0, "stopped early": 0, "errored": 0}

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment; a console printer does not pickle,
        # so a restored sweep reports progress through the logger.
        return {**self.__dict__, "emit": logger.info}

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

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.counts["running"] -= 1
        self.counts["errored"] += 1
        self.emit(f"trial {trial.trial_id} errored  [{self._status()}]")

    def _status(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in self.counts.items())

    def _config(self, trial: Any) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
