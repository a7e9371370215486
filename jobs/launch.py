"""Driver of a training run: validate the spec, prepare data, run the TorchTrainer, report."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from cluster import publish
from cluster.errors import StorageError
from cluster.storage import (
    append_line,
    exists,
    is_remote,
    join,
    read_text,
    remove_dir,
    write_text,
)
from jobs import metrics as m
from jobs.deepspeed_config import deepspeed_config_problems
from jobs.errors import SpecError, TrainingFailed
from jobs.loader import dump_spec
from jobs.spec import BUILTIN_IMAGES, BUILTIN_PREFIX, TrainSpec, global_batch_size
from jobs.worker import ATTEMPTS_FILE, FAILED, INTERRUPTIONS_FILE, MODEL_DIR, PREEMPTED

logger = logging.getLogger(__name__)

BUILTIN_DIGITS = next(iter(BUILTIN_IMAGES))
RESULT_FILE = "result.json"
SPEC_FILE = "spec.yaml"
SPEC_HISTORY_DIR = "spec_history"  # the specs a run had before a re-run changed them
RUN_STATE_FILE = "run_state.json"  # what the run's checkpoints were trained on
RUN_KIND = "run"  # what a run directory's marker says it is
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's registered checkpoints
SNAPSHOT_COPY = "checkpoint_manager_snapshot.raygen.json"  # raygen's copy, written whole


def resolve_paths(spec: TrainSpec) -> TrainSpec:
    """Make local paths absolute, so workers (running elsewhere) find them."""

    def absolute(path: str | None) -> str | None:
        if path is None or path.startswith(BUILTIN_PREFIX) or "://" in path:
            return path
        return str(Path(path).expanduser().resolve())

    data = spec.model_dump()
    data["data"]["train"] = [absolute(p) for p in spec.data.train]
    data["data"]["eval"] = [absolute(p) for p in spec.data.eval] if spec.data.eval else None
    data["data"]["prepared"] = absolute(spec.data.prepared)
    data["model"]["pretrained"] = absolute(spec.model.pretrained)
    data["tokenizer"]["path"] = absolute(spec.tokenizer.path)
    data["run"]["storage"] = absolute(spec.run.storage)
    data["sampling"]["inception_weights"] = absolute(spec.sampling.inception_weights)
    return TrainSpec.model_validate(data)


def spec_problems(spec: TrainSpec) -> list[str]:
    """Everything wrong with a spec that can be found without Ray: one line per problem."""
    problems = _common_problems(spec)
    if spec.model.family == "diffusion":
        return problems + _diffusion_problems(spec)
    return problems + _language_model_problems(spec)


def portable_problems(spec: TrainSpec) -> list[str]:
    """Problems found from the spec alone, without reading any file (checked before a
    spec is submitted to a cluster, whose files may differ from this machine's)."""
    return _common_problems(spec)


def _common_problems(spec: TrainSpec) -> list[str]:
    problems: list[str] = []
    t, ds, sc = spec.train, spec.deepspeed, spec.scaling
    if t.precision == "fp16" and not sc.use_gpu:
        problems.append(
            "`train.precision`: fp16 needs GPUs (DeepSpeed has no fp16 on CPU); use bf16 or "
            "fp32, or set scaling.use_gpu: true."
        )
    if ds.offload_params != "none" and ds.zero_stage != 3:
        problems.append(
            f"`deepspeed.offload_params`: parameter offload needs zero_stage: 3 (got "
            f"{ds.zero_stage}); set deepspeed.zero_stage: 3 or offload_params: none."
        )
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        problems.append(
            "`deepspeed.offload_optimizer`: optimizer offload needs zero_stage 1-3; "
            "raise deepspeed.zero_stage."
        )
    per_worker = sc.resources_per_worker or {}
    if sc.use_gpu and per_worker.get("GPU", 1) <= 0:
        problems.append("`scaling.resources_per_worker.GPU`: must be > 0 with use_gpu: true.")
    if t.warmup_steps >= t.max_steps and t.warmup_steps > 0:
        problems.append(
            f"`train.warmup_steps`: {t.warmup_steps} warm-up steps but max_steps is "
            f"{t.max_steps}; use fewer warm-up steps."
        )
    problems += deepspeed_config_problems(spec, sc.num_workers)
    return problems


def _language_model_problems(spec: TrainSpec) -> list[str]:
    from jobs.data import check_columns, list_input_files
    from jobs.models.causal_lm import config_class_problems

    problems = []
    for key in ("scheduler", "ema"):
        if getattr(spec.model, key) is not None:
            problems.append(
                f"`model.{key}`: only diffusion models have a {key}; remove it or set "
                "model.family: diffusion."
            )
    if BUILTIN_DIGITS in spec.data.train:
        problems.append(
            f"`data.train`: {BUILTIN_DIGITS} is an image data set; a causal-lm trains on text "
            "(e.g. builtin:python-stdlib), or set model.family: diffusion."
        )
        return problems
    if spec.model.pretrained and spec.tokenizer.train:
        problems.append(
            "`tokenizer.train`: a pretrained model's embeddings belong to its own tokenizer; "
            "remove tokenizer.train (its tokenizer is used) or train from `model.arch`."
        )
    if spec.model.pretrained and is_remote(spec.model.pretrained):
        problems += _remote_pretrained_problems(spec.model.pretrained)
    else:
        problems += config_class_problems(spec.model)
    if spec.tokenizer.path and not exists(join(spec.tokenizer.path, "tokenizer_config.json")):
        problems.append(
            f"`tokenizer.path`: {spec.tokenizer.path} is not a tokenizer directory (no "
            "tokenizer_config.json); save one with tokenizer.save_pretrained(dir)."
        )
    d = spec.data
    columns = {d.text_column: "data.text_column"}
    weighting = spec.train.group_weighting
    if weighting:
        builtin = [e for e in d.train + (d.eval or []) if e.startswith(BUILTIN_PREFIX)]
        if builtin:
            problems.append(
                f"`train.group_weighting`: {', '.join(builtin)} has no group column; group "
                "weighting needs Parquet data with a column naming each document's group."
            )
        columns[weighting.column] = "train.group_weighting.column"
    for key, entries in (("data.train", d.train), ("data.eval", d.eval or [])):
        try:
            check_columns(list_input_files(entries, key, None), columns, key)
        except SpecError as exc:
            problems += exc.problems
    return problems


def _diffusion_problems(spec: TrainSpec) -> list[str]:
    from jobs.data import list_input_files
    from jobs.image_data import check_image_columns
    from jobs.models.diffusion import unet_problems

    problems = []
    d, sampling = spec.data, spec.sampling
    if spec.train.group_weighting:
        problems.append(
            "`train.group_weighting`: group weighting is for language models (per-token "
            "losses); remove it, or audit the diffusion model's classes with class_accuracy."
        )
    tokenizer = spec.tokenizer
    if tokenizer.path or tokenizer.train:
        problems.append("`tokenizer`: diffusion models have no tokenizer; remove the section.")
    text_sets = [e for e in d.train + (d.eval or []) if e.startswith(BUILTIN_PREFIX)]
    text_sets = [e for e in text_sets if e != BUILTIN_DIGITS]
    if text_sets:
        problems.append(
            f"`data.train`: {', '.join(text_sets)} is text; a diffusion model trains on images "
            f"(Parquet with an image column, or {BUILTIN_DIGITS})."
        )
    if d.dedupe == "near":
        problems.append(
            "`data.dedupe`: near-duplicate detection is for text; images are deduplicated by "
            "their pixels with dedupe: exact."
        )
    labelled = BUILTIN_DIGITS in d.train or d.label_column is not None
    if BUILTIN_DIGITS in d.train and len(d.train) > 1 and d.label_column is None:
        problems.append(
            f"`data.label_column`: mixing {BUILTIN_DIGITS} with Parquet inputs needs their "
            "label column too; set data.label_column."
        )
    if spec.model.arch is not None or spec.model.pretrained:
        model_problems = unet_problems(spec.model, d.label_column is not None)
        problems += model_problems
        from jobs.models.diffusion import num_classes

        if not model_problems and num_classes(spec.model) and not labelled:
            problems.append(
                "`data.label_column`: the UNet is class-conditional (num_class_embeds), but "
                "the data has no labels; set data.label_column (or remove num_class_embeds)."
            )
    if sampling.fid_extractor == "classifier" and not labelled:
        problems.append(
            "`sampling.fid_extractor`: the classifier is trained on labelled images; set "
            "data.label_column, or use inception (with inception_weights) or none."
        )
    if sampling.fid_extractor == "inception":
        if not sampling.inception_weights:
            problems.append(
                "`sampling.inception_weights`: fid_extractor inception needs the path of a "
                "TorchScript Inception file (raygen never downloads weights); or use "
                "fid_extractor: classifier or none."
            )
        elif not exists(sampling.inception_weights):
            problems.append(
                f"`sampling.inception_weights`: {sampling.inception_weights} does not exist."
            )
    if sampling.fid_samples == 1:
        problems.append("`sampling.fid_samples`: an FID needs at least 2 samples (or 0: off).")
    for key, entries in (("data.train", d.train), ("data.eval", d.eval or [])):
        try:
            check_image_columns(list_input_files(entries, key, None), spec, key)
        except SpecError as exc:
            problems += exc.problems
    return problems


def _remote_pretrained_problems(uri: str) -> list[str]:
    from jobs.models.causal_lm import WEIGHT_FILES

    if not exists(join(uri, "config.json")):
        return [f"`model.pretrained`: {uri} has no config.json; give a save_pretrained dir."]
    if not any(exists(join(uri, name)) for name in WEIGHT_FILES):
        return [f"`model.pretrained`: {uri} has no safetensors weights."]
    return []


def validate_train_spec(spec: TrainSpec, source: str) -> TrainSpec:
    """Resolve paths and raise one SpecError listing every problem found without Ray."""
    spec = resolve_paths(spec)
    problems = spec_problems(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def run_dir_of(spec: TrainSpec) -> str:
    """`<run.storage>/<name>`: a local path or a URI."""
    return join(spec.run.storage, spec.name)


def prepared_dir_of(spec: TrainSpec) -> str:
    """Where the run's prepared data lives: `data.prepared`, default `<run>/data`."""
    return spec.data.prepared or join(run_dir_of(spec), "data")


def check_same_run(spec: TrainSpec, run_dir: str, source: str) -> dict[str, Any] | None:
    """A re-run continues its run only if the spec changed in keys that schedule the rest
    (`jobs.spec.RESUMABLE_KEYS`); returns the recorded spec (None for a new run).

    Raises:
        SpecError: every other changed key, with its old and new value.
    """
    import yaml

    from jobs.spec import RESUMABLE_KEYS

    text = read_text(join(run_dir, SPEC_FILE))
    if text is None:
        return None
    recorded = yaml.safe_load(text) or {}
    changes = [
        (key, old, new)
        for key, old, new in spec_changes(recorded, spec.model_dump(mode="json"))
        if key not in RESUMABLE_KEYS
    ]
    if changes:
        lines = [f"`{key}`: was {old!r}, now {new!r}" for key, old, new in changes]
        raise SpecError(
            source,
            [
                *lines,
                f"{run_dir} was trained with the spec in its {SPEC_FILE}; a re-run continues "
                "a run only when what changed is how far it trains or how often it logs, "
                "evaluates and checkpoints. Start a new run with --fresh (it goes to "
                f"{fresh_name(spec)}), or give this one another name.",
            ],
        )
    return recorded


def spec_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple]:
    """(dotted key, old value, new value) for every key whose value differs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += spec_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append((f"{prefix}{key}", a, b))
    return changes


def record_spec(run_dir: str, spec: TrainSpec, recorded: dict[str, Any] | None) -> None:
    """Write the run's `spec.yaml`, keeping the one it replaces in `spec_history/`."""
    import yaml

    current = spec.model_dump(mode="json")
    if recorded is not None and recorded != current:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        history = join(run_dir, SPEC_HISTORY_DIR, f"{stamp}-{time.time_ns() % 10**9:09d}.yaml")
        write_text(history, yaml.safe_dump(recorded, sort_keys=False))
    write_text(join(run_dir, SPEC_FILE), dump_spec(spec))


def _read_snapshot(uri: str) -> dict[str, Any] | None:
    text = read_text(uri)
    if not text:
        return None
    try:
        snapshot = json.loads(text)
    except ValueError:
        return None
    return snapshot if isinstance(snapshot, dict) and "checkpoint_results" in snapshot else None


def registered_checkpoints(run_dir: str) -> list[str] | None:
    """Names of the checkpoint directories Ray Train has registered (whole ones), from its
    snapshot, else from raygen's copy of it; None when neither can be read."""
    for name in (SNAPSHOT_FILE, SNAPSHOT_COPY):
        snapshot = _read_snapshot(join(run_dir, name))
        if snapshot is not None:
            return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    return None


def copy_snapshot(run_dir: str) -> None:
    """Keep a copy of Ray Train's checkpoint snapshot as it is now (whole: written aside and
    renamed). Ray rewrites its snapshot in place, and on a full disk leaves it empty: the
    registered checkpoints would be forgotten, and the run could not resume."""
    snapshot = _read_snapshot(join(run_dir, SNAPSHOT_FILE))
    if snapshot is not None:
        write_text(join(run_dir, SNAPSHOT_COPY), json.dumps(snapshot))


def repair_snapshot(run_dir: str) -> None:
    """Put raygen's copy back when Ray Train's snapshot was left torn (a full disk)."""
    path = join(run_dir, SNAPSHOT_FILE)
    if read_text(path) is None or _read_snapshot(path) is not None:
        return
    copy = _read_snapshot(join(run_dir, SNAPSHOT_COPY))
    if copy is None:
        return
    logger.warning("%s was left torn; restoring the copy raygen kept of it", path)
    try:
        write_text(path, json.dumps(copy))
    except Exception as exc:  # still no room: the copy stays, and is used
        logger.warning("could not restore %s: %s", path, exc)


def remove_unregistered_checkpoints(run_dir: str) -> list[str]:
    """Delete the checkpoint directories of this run that Ray Train never registered: what
    a worker killed mid-upload (or a full disk) left half written. Only in a raygen run
    directory, only directories named as raygen names checkpoints. Returns their names."""
    from jobs.checkpoint import step_of_checkpoint

    if publish.read_marker(run_dir) is None:
        return []
    known = registered_checkpoints(run_dir)
    if known is None:  # no readable record of what is registered: delete nothing
        return []
    registered = set(known)
    tops = {name.split("/", 1)[0] for name in publish.listing(run_dir) if "/" in name}
    partial = sorted(
        name for name in tops if step_of_checkpoint(name) is not None and name not in registered
    )
    for name in partial:
        logger.warning("removing %s: a checkpoint never finished (not registered)", name)
        remove_dir(join(run_dir, name))
    return partial


def check_same_data(run_dir: str, fingerprint: str, source: str) -> None:
    """Refuse to resume checkpoints trained on other data (an input file or the tokenizer
    changed in place since the run began: the same spec, other contents).

    Raises:
        SpecError: naming both fingerprints and the way out.
    """
    text = read_text(join(run_dir, RUN_STATE_FILE))
    if text is None or not exists(join(run_dir, SNAPSHOT_FILE)):
        return  # nothing trained yet
    trained_on = json.loads(text).get("data_fingerprint")
    if trained_on and trained_on != fingerprint:
        raise SpecError(
            source,
            f"`data`: the data changed since {run_dir} began (fingerprint {trained_on} -> "
            f"{fingerprint}: an input file or the tokenizer has other contents); its "
            "checkpoints were trained on the old data and its exported model would pair old "
            "weights with new token ids. Restore the old data to continue, or start over "
            "with --fresh.",
        )


def fresh_name(spec: TrainSpec) -> str:
    """The spec's name, or `<name>-<k>` with the first k whose run dir is free."""
    if not exists(run_dir_of(spec)):
        return spec.name
    k = 2
    while exists(join(spec.run.storage, f"{spec.name}-{k}")):
        k += 1
    return f"{spec.name}-{k}"


def launch(
    spec: TrainSpec,
    source: str = "spec",
    address: str | None = None,
    fresh: bool = False,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
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
        verbose: forward the workers' own output (DeepSpeed, Ray Train) to this process.
        trial: what a sweep trial adds (report callbacks, a checkpoint to start from).

    Raises:
        SpecError: the spec or its inputs are invalid (nothing is started).
        ClusterError: Ray is unreachable or too small.
        TrainingFailed: the run failed after it started.
    """
    spec = validate_train_spec(spec, source)
    if fresh:
        spec = spec.model_copy(update={"name": fresh_name(spec)})
    run_dir = run_dir_of(spec)
    recorded = check_same_run(spec, run_dir, source)
    from jobs.data import data_fingerprint

    check_same_data(run_dir, data_fingerprint(spec), source)
    previous = read_result(run_dir)
    if (
        previous
        and previous.get("status") == "completed"
        and previous.get("final_step", 0) >= spec.train.max_steps
        and publish.state(join(run_dir, MODEL_DIR)) == "complete"
    ):
        logger.info("%s is already trained to step %s.", run_dir, previous["final_step"])
        return {**previous, "up_to_date": True}

    from cluster.connection import capacity_problems, connect

    embedded = connect(address, log_to_driver=verbose)
    per_worker = dict(spec.scaling.resources_per_worker or {"CPU": 1})
    if spec.scaling.use_gpu:
        per_worker.setdefault("GPU", 1)
    problems = capacity_problems(per_worker, spec.scaling.num_workers, embedded)
    if problems:
        raise SpecError(source, problems)

    publish.mark(run_dir, RUN_KIND)
    record_spec(run_dir, spec, recorded)
    repair_snapshot(run_dir)
    remove_unregistered_checkpoints(run_dir)

    from jobs.data import prepare_data

    prepared_dir = prepared_dir_of(spec)
    stats = prepare_data(spec, prepared_dir)
    write_text(
        join(run_dir, RUN_STATE_FILE),
        json.dumps({"data_fingerprint": stats["fingerprint"], "prepared": prepared_dir}, indent=2),
    )
    world = spec.scaling.num_workers
    unit = (
        "images" if spec.model.family == "diffusion" else f"sequences of {spec.data.seq_len} tokens"
    )
    per_rank = stats["train_examples"] // world
    if per_rank < global_batch_size(spec, world) // world:
        raise SpecError(
            source,
            f"`train`: one optimizer step takes micro_batch_size x grad_accum x num_workers = "
            f"{global_batch_size(spec, world)} {unit}, but the prepared training set has only "
            f"{stats['train_examples']}; lower train.micro_batch_size or train.grad_accum"
            + ("" if spec.model.family == "diffusion" else " or data.seq_len")
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
    tail = _MetricsTail(join(run_dir, m.METRICS_FILE), on_metrics) if on_metrics else None
    try:
        result = _fit(spec, run_dir, prepared_dir, stats, per_worker, trial or TrialHooks())
    finally:
        if tail:
            tail.stop()
        remove_unregistered_checkpoints(run_dir)  # first: it frees room on a full disk
        repair_snapshot(run_dir)
    summary = _summarize(spec, run_dir, result, started)
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
            f"Attempts, errors and metrics are in {run_dir} ({RESULT_FILE}, {m.METRICS_FILE}); "
            "rerun with --verbose to see the workers' own logs."
        )
    return summary


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
    """

    callbacks: list[Any] = field(default_factory=list)
    resume_from: str | None = None
    keep_best: tuple[str, str] | None = None
    datasets: dict[str, Any] | None = None
    gate: Any = None


def _fit(
    spec: TrainSpec,
    run_dir: str,
    prepared_dir: str,
    stats: dict,
    per_worker: dict,
    trial: TrialHooks,
) -> Any:
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.connection import total_resources

    if spec.model.family == "diffusion":
        from jobs.train_diffusion import train_fn_per_worker

        prepared = {
            "dir": prepared_dir,
            "image_shape": stats["image_shape"],
            "train_examples": stats["train_examples"],
            "eval_examples": stats["eval_examples"],
            "fid": stats.get("fid"),
        }
    else:
        from jobs.train_lm import train_fn_per_worker

        prepared = {
            "tokenizer": stats["tokenizer"],
            "train_sequences": stats["train_sequences"],
            "eval_sequences": stats["eval_sequences"],
            "groups": stats.get("groups"),
        }

    options = ray.data.ExecutionOptions(preserve_order=True)  # deterministic resumption
    datasets = trial.datasets or {
        split: ray.data.read_parquet(join(prepared_dir, split)) for split in ("train", "eval")
    }
    spare_cpus = total_resources().get("CPU", 0) - spec.scaling.num_workers * per_worker.get(
        "CPU", 0
    )
    if spare_cpus < 1 and not trial.datasets:
        # Ray Data's read tasks need a free CPU; with every CPU held by a training worker
        # they would never run, so read the shards into the object store up front.
        logger.info("No CPU left beside the workers: loading prepared data before training.")
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
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
            storage_path=spec.run.storage,
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
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        # Workers failed more often than run.max_failures allows: summarize, don't crash.
        try:
            checkpoint = ray.train.Result.from_path(run_dir).checkpoint
        except Exception:  # nothing registered yet: no snapshot to read
            checkpoint = None
        return _FailedRun(exc, checkpoint)


class _FailedRun:
    """Stands in for Ray's Result when `fit` raised: what `_summarize` reads."""

    def __init__(self, error: BaseException, checkpoint: Any):
        self.error = error
        self.checkpoint = checkpoint


def _summarize(spec: TrainSpec, run_dir: str, result: Any, started: float) -> dict[str, Any]:
    from jobs.checkpoint import step_of_checkpoint

    rows = m.read_metrics(join(run_dir, m.METRICS_FILE))
    final: dict[str, Any] = {}
    for row in rows:
        final.update(row)
    checkpoint = None
    if result.checkpoint:
        # Ray reports paths inside the filesystem; put the scheme back for URIs.
        scheme = run_dir.split("://", 1)[0] + "://" if is_remote(run_dir) else ""
        checkpoint = scheme + result.checkpoint.path
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
            "metrics": join(run_dir, m.METRICS_FILE),
            "tensorboard": join(run_dir, m.TENSORBOARD_DIR),
            "checkpoint": checkpoint,
            "model": join(run_dir, MODEL_DIR) if error is None else None,
            "samples": (join(run_dir, m.SAMPLES_DIR) if spec.model.family == "diffusion" else None),
        },
        "attempts": read_attempts(run_dir),
        "wall_time_s": round(time.time() - started, 1),
    }


def read_result(run_dir: str) -> dict[str, Any] | None:
    text = read_text(join(run_dir, RESULT_FILE))
    return json.loads(text) if text else None


def read_attempts(run_dir: str) -> list[dict[str, Any]]:
    """Each start of the worker group: the step it resumed from, and why it started
    (`reason`: `started`, the run's first; `failed` or `preempted`, restarted by Ray Train
    after a failure or a preemption; `resumed`, a later `raygen train` of the run), with
    the error that ended the attempt before it."""
    attempts = _read_jsonl(join(run_dir, ATTEMPTS_FILE))
    interruptions = _read_jsonl(join(run_dir, INTERRUPTIONS_FILE))
    out = []
    for i, attempt in enumerate(attempts):
        prev_start = attempts[i - 1]["started_at"] if i else float("-inf")
        between = [r for r in interruptions if prev_start <= r["at"] <= attempt["started_at"]]
        errors = [r["error"] for r in between if r.get("error")]
        kinds = {r.get("kind", FAILED) for r in between}
        if not i:
            reason = "started"
        elif PREEMPTED in kinds:
            reason = PREEMPTED
        elif kinds:
            reason = FAILED
        else:
            reason = "resumed"
        out.append(
            {
                "attempt": i + 1,
                "reason": reason,
                "resumed_from_step": attempt["resumed_from_step"],
                "started_at": attempt["started_at"],
                "previous_error": errors[-1] if errors else None,
            }
        )
    return out


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line torn by a crash mid-write is skipped."""
    rows = []
    for number, line in enumerate((read_text(uri) or "").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is torn (a write was cut off); skipping it", uri, number)
    return rows


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
        attempts = _read_jsonl(join(self.run_dir, ATTEMPTS_FILE))
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
    """Follows a run's metrics in a thread and hands each new row to a callback, reading
    only what was added since the last look (the file's new bytes; a remote log's new
    parts)."""

    def __init__(self, path: str, callback: Callable[[dict[str, Any]], None]):
        self.path, self.callback = path, callback
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
                self.callback(record)
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
