"""A run directory, `<run.storage>/<name>/`: the name of every file raygen keeps there, and
the records read and written through them (the spec and its history, attempts and
interruptions, Ray Train's checkpoint snapshot and raygen's copy of it, the result).

    spec.yaml  spec_history/  run_state.json  attempts.jsonl  failures.jsonl
    metrics.jsonl (+ metrics.jsonl.d/ on object stores)  tensorboard/  samples/
    checkpoint_<step>/  checkpoint_manager_snapshot.json (+ .raygen.json)
    model/  result.json  data/ (prepared data, unless data.prepared says elsewhere)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from raygen.cluster import publish
from raygen.cluster.storage import exists, join, read_text, remove_dir, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.loader import dump_spec
from raygen.jobs.spec import TrainSpec

logger = logging.getLogger(__name__)


ATTEMPTS_FILE = "attempts.jsonl"


MODEL_DIR = "model"
ADAPTER_DIR = "adapter"  # a LoRA run's PEFT adapter, beside the merged model


MODEL_KIND = "model"  # what a published model directory's marker says it is
ADAPTER_KIND = "adapter"


PREEMPTED, FAILED = "preempted", "failed"  # the kinds of interruption
INTERRUPTIONS_FILE = "failures.jsonl"  # worker-group failures and preemption notices


METRICS_FILE = "metrics.jsonl"


TENSORBOARD_DIR = "tensorboard"


SAMPLES_DIR = "samples"


CHECKPOINT_PREFIX = "checkpoint_"


_STEP_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_of_checkpoint(path: str) -> int | None:
    """The step a checkpoint directory was saved at, from its name."""
    match = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


RESULT_FILE = "result.json"


SPEC_FILE = "spec.yaml"


SPEC_HISTORY_DIR = "spec_history"  # the specs a run had before a re-run changed them


RUN_STATE_FILE = "run_state.json"  # what the run's checkpoints were trained on


RUN_KIND = "run"  # what a run directory's marker says it is


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's registered checkpoints


SNAPSHOT_COPY = "checkpoint_manager_snapshot.raygen.json"  # raygen's copy, written whole


def durable_storage_problem(key: str, storage: str, pods: bool = False) -> str | None:
    """Why `storage` would be lost by a job on a cluster (None if it would not): a relative
    path lands in the job's temporary copy of the working directory; on Kubernetes
    (`pods`) any local path goes with the pod."""
    if "://" in storage or (os.path.isabs(storage) and not pods):
        return None
    if pods:
        return (
            f"`{key}`: {storage!r} is a local path: a pod's disk goes with the pod. Give a "
            f"bucket the pods can reach: --set {key}=s3://BUCKET/runs (or gs://, abfs://)."
        )
    return (
        f"`{key}`: {storage!r} is relative: on the cluster it would be inside the job's "
        "temporary copy of the working directory, and lost. Give storage every node and you "
        f"can reach: --set {key}=s3://BUCKET/runs (or an absolute path on a shared "
        "filesystem)."
    )


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

    from raygen.jobs.spec import is_resumable

    text = read_text(join(run_dir, SPEC_FILE))
    if text is None:
        return None
    recorded = yaml.safe_load(text) or {}
    changes = [
        (key, old, new)
        for key, old, new in spec_changes(recorded, spec.model_dump(mode="json"))
        if not is_resumable(key)
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
    from raygen.jobs.run_dir import step_of_checkpoint

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


def read_result(run_dir: str) -> dict[str, Any] | None:
    text = read_text(join(run_dir, RESULT_FILE))
    return json.loads(text) if text else None


def read_attempts(run_dir: str) -> list[dict[str, Any]]:
    """Each start of the worker group: the step it resumed from, and why it started
    (`reason`: `started`, the run's first; `failed` or `preempted`, restarted by Ray Train
    after a failure or a preemption; `resumed`, a later `raygen train` of the run), with
    the error that ended the attempt before it."""
    attempts = read_jsonl(join(run_dir, ATTEMPTS_FILE))
    interruptions = read_jsonl(join(run_dir, INTERRUPTIONS_FILE))
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
                "launched_at": attempt.get("launched_at"),
                "started_at": attempt["started_at"],
                "torch_threads": attempt.get("torch_threads"),
                "previous_error": errors[-1] if errors else None,
            }
        )
    return out


def read_jsonl(uri: str) -> list[dict[str, Any]]:
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
