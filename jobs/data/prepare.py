"""Prepare a training spec's data with Ray Data, once: the prepared directory's fingerprint
(inputs' contents, options, tokenizer) decides whether it is up to date; text goes
through `text`, images through `images` and `fid_reference`. A directory is published
whole (`cluster.publish`): a cut-off preparation is never taken for a finished one."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from raygen.cluster import publish
from raygen.cluster.errors import StorageError
from raygen.cluster.storage import (
    content_id,
    is_remote,
    join,
    list_files,
    read_text,
    remove_dir,
    write_text,
)
from raygen.jobs.data.inputs import InputFile, list_input_files
from raygen.jobs.data.text import prepare_text
from raygen.jobs.errors import SpecError
from raygen.jobs.progress import Progress, Report
from raygen.jobs.spec import IMAGE_FAMILIES, TrainSpec

logger = logging.getLogger(__name__)


PREPARED_FORMAT = 4
STATS_FILE = "data_stats.json"
PREPARED_KIND = "prepared-data"  # what a prepared directory's marker says it is


def fingerprint(spec: TrainSpec, train_files: list[InputFile], eval_files: list[InputFile]) -> str:
    """Hash of everything that determines the prepared data: the inputs' contents, the
    options, the tokenizer's files and the format. Contents, not names: a file or a
    tokenizer replaced in place (same path) changes it (`cluster.storage.content_id`)."""
    d = spec.data
    identity = {
        "format": PREPARED_FORMAT,
        "train": [_identity(f) for f in train_files],
        "eval": [_identity(f) for f in eval_files],
        "options": d.model_dump(exclude={"train", "eval", "prepared"}),
        "tokenizer": spec.tokenizer.model_dump(),
        "tokenizer_files": _dir_contents(spec.tokenizer.path) if spec.tokenizer.path else None,
        # A pretrained model's tokenizer and config (its weights do not shape the data).
        "pretrained": _dir_contents(spec.model.pretrained) if spec.model.pretrained else None,
        "seed": spec.train.seed,
        # Packed blocks carry per-token groups when the run weights groups.
        "group_column": spec.train.group_weighting.column if spec.train.group_weighting else None,
    }
    if spec.model.family in IMAGE_FAMILIES:
        from raygen.jobs.pretrained import image_shape_of

        # The images are resized to the network's input, and the FID reference is built from
        # them; neither the family nor the starting weights matter (a VAE, the UNets and
        # fine-tuning runs on the same images share their prepared data).
        identity["tokenizer"] = identity["tokenizer_files"] = identity["pretrained"] = None
        identity["image_shape"] = image_shape_of(spec.model)
        identity["fid"] = (
            spec.sampling.fid_extractor,
            content_id(spec.sampling.inception_weights)
            if spec.sampling.inception_weights
            else None,
        )
        if spec.model.vae is not None:  # its latents are stored: every file, weights too
            from raygen.jobs.pretrained import latent_vae_dir

            identity["latent_vae"] = _dir_contents(latent_vae_dir(spec.model), weights=True)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def _identity(f: InputFile) -> tuple[str, str]:
    return (f.path, "builtin" if f.kind == "digits" else content_id(f.path))


def input_record(f: InputFile) -> dict[str, Any]:
    """An input file as `data_stats.json` lists it: path, size and content id (a hash of
    a local file's bytes, an object's ETag)."""
    return {"path": f.path, "size": f.size, "content_id": _identity(f)[1]}


def _dir_contents(uri: str, weights: bool = False) -> dict[str, str]:
    """{relative path: content id} of a directory's files, weights left out unless asked."""
    root = uri.rstrip("/") if is_remote(uri) else str(Path(uri).resolve())
    return {
        f.uri[len(root) :].lstrip("/"): content_id(f.uri)
        for f in list_files(uri, "")
        if (weights or not f.uri.endswith(WEIGHT_SUFFIXES)) and "/." not in f.uri[len(root) :]
    }


def read_stats(prepared_dir: str) -> dict[str, Any] | None:
    """The `data_stats.json` of a prepared directory raygen finished writing, else None."""
    if publish.state(prepared_dir) != "complete":
        return None
    text = read_text(join(prepared_dir, STATS_FILE))
    return json.loads(text) if text else None


def _older_prepared_data(files: dict[str, int]) -> bool:
    """What raygen versions before the directory marker left: their stats file."""
    return STATS_FILE in files


def data_fingerprint(spec: TrainSpec) -> str:
    """The fingerprint the spec's prepared data has (or will have): its inputs' contents,
    options and tokenizer."""
    d = spec.data
    train_files = list_input_files(d.train, "data.train", d.max_bytes)
    eval_files = list_input_files(d.eval, "data.eval", None) if d.eval else []
    return fingerprint(spec, train_files, eval_files)


def prepare_data(
    spec: TrainSpec,
    prepared_dir: str,
    force: bool = False,
    address: str | None = None,
    report: Report | None = None,
) -> dict[str, Any]:
    """Prepare the spec's corpus into `prepared_dir` unless it is up to date.

    `spec` must have passed `jobs.launch.validate_train_spec` (inputs and columns checked).
    Ray is needed only to prepare: this process connects then (to `address`, else
    $RAY_ADDRESS, else an embedded local Ray; nothing when already connected). `report`
    hears each stage's progress (`jobs.progress`).

    Returns:
        The data stats (also written to `prepared_dir/data_stats.json`).

    Raises:
        SpecError: inputs missing, unreadable, or empty after filtering.
    """

    d = spec.data
    train_files = list_input_files(d.train, "data.train", d.max_bytes)
    eval_files = list_input_files(d.eval, "data.eval", None) if d.eval else []
    fp = fingerprint(spec, train_files, eval_files)
    stats = read_stats(prepared_dir)
    if stats and stats.get("fingerprint") == fp and not force:
        logger.info("Prepared data in %s is up to date (fingerprint %s).", prepared_dir, fp)
        return stats

    from raygen.cluster.connection import connect

    publish.check_ours(prepared_dir, "data.prepared", _older_prepared_data)
    connect(address)
    logger.info("Preparing data into %s ...", prepared_dir)
    # Marked as being written until the stats and marker are: a cut-off preparation is
    # never taken for a finished one, and is redone.
    publish.begin(prepared_dir, "data.prepared", _older_prepared_data)
    try:
        with Progress(report) as progress:
            if spec.model.family in IMAGE_FAMILIES:
                from raygen.jobs.data.fid_reference import prepare_fid_reference
                from raygen.jobs.data.images import prepare_images

                stats = prepare_images(spec, prepared_dir, train_files, eval_files, fp, progress)
                stats["fid"] = prepare_fid_reference(spec, prepared_dir, stats)
            else:
                stats = prepare_text(spec, prepared_dir, train_files, eval_files, fp, progress)
        # What was read, as the fingerprint identified it: lineage checks it against today.
        stats["inputs"] = {
            "train": [input_record(f) for f in train_files],
            "eval": [input_record(f) for f in eval_files],
        }
        write_text(join(prepared_dir, STATS_FILE), json.dumps(stats, indent=2))
        publish.finish(prepared_dir, PREPARED_KIND)
    except BaseException as exc:
        _clear_partial(prepared_dir)
        problem = _spec_cause(exc)
        if problem is not None:  # found in the data, inside a Ray task (a bad JSON line)
            raise problem from None
        cause = _storage_cause(exc) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        raise StorageError(
            f"preparing data into {prepared_dir} failed reading or writing storage: {cause}; "
            "nothing of it was kept."
        ) from None
    return stats


def _clear_partial(prepared_dir: str) -> None:
    """Remove what a failed preparation wrote (raygen's own, marked as under way)."""
    try:
        if publish.state(prepared_dir) == "interrupted":
            remove_dir(prepared_dir)
    except Exception:  # the storage may be what failed: say so, keep the first error
        logger.warning("could not remove the partial preparation in %s", prepared_dir)


def _spec_cause(exc: BaseException) -> SpecError | None:
    """The SpecError behind `exc`, if any. From a Ray Data task it arrives as text only (its
    traceback, in the task error's message): the last line naming it is read back."""
    import re

    for _ in range(10):
        if exc is None or isinstance(exc, SpecError):
            return exc
        named = re.findall(r"SpecError: ([\w.]+): (.+)", re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
        if named:
            return SpecError(*named[-1])
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _storage_cause(exc: BaseException) -> str | None:
    """What an I/O error behind `exc` (also inside a Ray task's error) says, or None.

    Inputs were checked before preparing; an I/O error now means storage changed or failed
    meanwhile (a deleted object, lost credentials, a full disk): a user problem, not a bug.
    """
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            return _last_error_line(str(exc)) or type(exc).__name__
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def _last_error_line(text: str) -> str:
    """The error itself from an error's text, without the exception's class name and
    terminal colors: the last line that names an exception (`OSError: ...`, where a Ray
    task's traceback ends), else the first line."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return re.sub(r"^[\w.]*(Error|Exception): ", "", named[-1] if named else lines[0])
