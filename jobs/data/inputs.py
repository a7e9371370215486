"""A corpus's input files: entries (files, directories, object-store prefixes, builtin
data sets) expanded into files, and their columns checked."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raygen.cluster.storage import FileEntry, is_remote, join, list_files, open_input, read_text
from raygen.jobs.errors import SpecError
from raygen.jobs.spec import BUILTIN_CORPORA, BUILTIN_IMAGES, BUILTIN_PREFIX, DataSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    """One file of a corpus, and what identifies its content for the fingerprint."""

    path: str
    size: int
    mtime_ns: int
    # "parquet", "jsonl" (JSON Lines), "arrow" (a shard of a Hugging Face `save_to_disk`
    # data set), "text" (one document per file) or "digits" (builtin images)
    kind: str


DIGITS_ROWS = 1797  # scikit-learn's digits
# File names read as data in directories and prefixes, and their kinds.
DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl"}
_HF_STATE, _HF_DICT = "state.json", "dataset_dict.json"


CHAT_COLUMNS = ("messages", "prompt", "response")


def source_columns(d: DataSpec) -> dict[str, str]:
    """The input columns a corpus is read from, and their names here."""
    if d.format == "text":
        return {d.text_column: "text"}
    if d.prompt_column:
        return {d.prompt_column: "prompt", d.response_column: "response"}
    return {d.messages_column: "messages"}


def list_input_files(entries: list[str], key: str, max_bytes: int | None) -> list[InputFile]:
    """Expand corpus entries (files, directories, object-store prefixes, Hugging Face
    `save_to_disk` directories, builtin corpora) into files, in order.

    With `max_bytes`, whole files are taken in order until their total size reaches it.

    Raises:
        SpecError: an entry does not exist or holds no data files.
    """
    files: list[InputFile] = []
    problems = []
    for entry in entries:
        if entry.startswith(BUILTIN_PREFIX):
            if entry in BUILTIN_IMAGES:
                files.append(InputFile(entry, 0, 0, "digits"))
            elif entry in BUILTIN_CORPORA:
                files.extend(_stdlib_sources())
            else:
                known = ", ".join([*BUILTIN_CORPORA, *BUILTIN_IMAGES])
                problems.append(f"`{key}`: unknown builtin data set {entry!r}; known: {known}.")
            continue
        if not is_remote(entry) and not Path(entry).exists():
            problems.append(
                f"`{key}`: {entry} does not exist; give a Parquet or JSON Lines file, a "
                "directory of them, or a Hugging Face save_to_disk directory."
            )
            continue
        try:
            files.extend(_data_files(entry, key))
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(key, problems)
    if max_bytes is not None:
        kept, total = [], 0
        for f in files:
            if total >= max_bytes:
                break
            kept.append(f)
            total += f.size
        files = kept
    return files


def _data_files(entry: str, key: str) -> list[InputFile]:
    """The data files of one entry, local or remote (a StorageError names a storage cause)."""
    base = (entry if is_remote(entry) else str(Path(entry).resolve())).rstrip("/")
    listed = list_files(entry, "")
    if len(listed) == 1 and listed[0].uri.rstrip("/") == base:  # a file
        kind = _kind(base)
        if kind is None:
            raise SpecError(
                key,
                f"`{key}`: {entry} is not a Parquet (.parquet) or JSON Lines (.jsonl) file.",
            )
        return [InputFile(listed[0].uri, listed[0].size, listed[0].mtime_ns, kind)]
    top = {f.uri[len(base) + 1 :]: f for f in listed}
    hub = _hf_dataset(base, {name: f for name, f in top.items() if "/" not in name}, key)
    if hub is not None:
        return hub
    found = [InputFile(f.uri, f.size, f.mtime_ns, k) for f in listed if (k := _kind(f.uri))]
    if not found:
        raise SpecError(
            key,
            f"`{key}`: {entry} holds no .parquet or .jsonl files (nor a Hugging Face "
            "save_to_disk data set).",
        )
    return found


def _kind(uri: str) -> str | None:
    return next((k for suffix, k in DATA_SUFFIXES.items() if uri.endswith(suffix)), None)


def _hf_dataset(entry: str, top: dict[str, FileEntry], key: str) -> list[InputFile] | None:
    """The Arrow shards of a Hugging Face `save_to_disk` data set at `entry` (None when it is
    not one). A DatasetDict's root is refused with its splits named."""
    if _HF_DICT in top and not any(name.endswith(".arrow") for name in top):
        splits = json.loads(read_text(join(entry, _HF_DICT)) or "{}").get("splits", [])
        raise SpecError(
            key,
            f"`{key}`: {entry} is a Hugging Face DatasetDict with splits "
            f"{', '.join(splits)}; name one, e.g. {join(entry, splits[0] if splits else 'train')}.",
        )
    if _HF_STATE not in top:
        return None
    state = json.loads(read_text(join(entry, _HF_STATE)) or "{}")
    names = [f["filename"] for f in state.get("_data_files", [])]
    missing = [n for n in names if n not in top]
    if not names or missing:
        raise SpecError(
            key,
            f"`{key}`: {entry} looks like a Hugging Face save_to_disk directory, but its "
            f"state.json lists {', '.join(missing) + ' (missing)' if missing else 'no files'}.",
        )
    return [InputFile(top[n].uri, top[n].size, top[n].mtime_ns, "arrow") for n in names]


def _input_file(path: Path, kind: str) -> InputFile:
    stat = path.stat()
    return InputFile(str(path.resolve()), stat.st_size, stat.st_mtime_ns, kind)


def _stdlib_sources() -> list[InputFile]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    paths = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # not walked at all
        paths += [Path(folder, name) for name in names if name.endswith(".py")]
    return [_input_file(p, "text") for p in sorted(paths)]


def check_columns(files: list[InputFile], columns: dict[str, str], key: str) -> None:
    """Raise a SpecError naming the available columns when a data file lacks one of
    `columns` (column -> the spec key that names it)."""
    for f in files:
        if f.kind in ("text", "digits"):
            continue
        names = file_columns(f, key)
        for column, spec_key in columns.items():
            if column not in names:
                raise SpecError(
                    spec_key,
                    f"{f.path} has no column {column!r}; its columns are {', '.join(names)}. "
                    f"Set `{spec_key}` to the right one.",
                )


def file_columns(f: InputFile, key: str) -> list[str]:
    """The columns of a data file (of JSON Lines: the keys of its first object)."""
    try:
        with open_input(f.path) as handle:
            if f.kind == "parquet":
                return pq.read_schema(handle).names
            if f.kind == "arrow":
                return pa.ipc.open_stream(handle).schema.names
            for number, line in enumerate(_lines(handle, f.path, key), 1):
                if line.strip():
                    return list(_json_object(line, f.path, number, key))
            return []
    except (pa.ArrowInvalid, OSError) as exc:
        raise SpecError(key, f"{f.path} is not a readable {_NAMES[f.kind]} file: {exc}.") from None


def count_rows(files: list[InputFile]) -> int:
    """Rows (documents, conversations, images) in the inputs: Parquet's from its metadata,
    a text file is one; JSON Lines and Arrow files are read through."""
    total = 0
    for f in files:
        if f.kind == "digits":
            total += DIGITS_ROWS
        elif f.kind == "text":
            total += 1
        else:
            with open_input(f.path) as handle:
                if f.kind == "parquet":
                    total += pq.ParquetFile(handle).metadata.num_rows
                elif f.kind == "arrow":
                    total += sum(b.num_rows for b in pa.ipc.open_stream(handle))
                else:
                    total += sum(1 for line in _lines(handle, f.path, "data") if line.strip())
    return total


def read_file(path: str, kind: str, columns: list[str], key: str) -> pa.Table:
    """`columns` of a whole JSON Lines or Arrow file, with a `row_hash` per row (from the
    file and row number: the same on every read)."""
    with open_input(path) as handle:
        if kind == "arrow":
            table = pa.ipc.open_stream(handle).read_all().select(columns)
        else:
            rows = [
                _json_object(line, path, number, key)
                for number, line in enumerate(_lines(handle, path, key), 1)
                if line.strip()
            ]
            missing = [c for c in columns if any(c not in row for row in rows)]
            if missing:
                raise SpecError(key, f"{path}: a line has no {missing[0]!r}.")
            table = pa.Table.from_pylist([{c: row[c] for c in columns} for row in rows])
    seed = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
    hashes = (np.arange(table.num_rows, dtype=np.uint64) + np.uint64(seed)) * np.uint64(
        0x9E3779B97F4A7C15
    )
    return table.append_column("row_hash", pa.array(hashes, pa.uint64()))


def _lines(handle: Any, path: str, key: str) -> Any:
    """The lines of a UTF-8 text file opened by `open_input`."""
    try:
        yield from io.TextIOWrapper(handle, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(key, f"{path} is not UTF-8 text: {exc}.") from None


def _json_object(line: bytes | str, path: str, number: int, key: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise SpecError(key, f"{path} line {number} is not JSON: {exc}.") from None
    if not isinstance(value, dict):
        raise SpecError(key, f"{path} line {number} is not a JSON object ({{...}}).")
    return value


_NAMES = {"parquet": "Parquet", "jsonl": "JSON Lines", "arrow": "Arrow (Hugging Face)"}
