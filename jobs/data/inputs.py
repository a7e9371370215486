"""A corpus's input files: entries (files, directories, object-store prefixes, builtin
data sets) expanded into files, and their columns checked."""

from __future__ import annotations

import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raygen.cluster.storage import (
    is_remote,
    list_files,
    open_input,
)
from raygen.jobs.errors import SpecError
from raygen.jobs.spec import BUILTIN_CORPORA, BUILTIN_IMAGES, BUILTIN_PREFIX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    """One file of a corpus, and what identifies its content for the fingerprint."""

    path: str
    size: int
    mtime_ns: int
    kind: str  # "parquet", "text" (one document per file) or "digits" (builtin images)


def list_input_files(entries: list[str], key: str, max_bytes: int | None) -> list[InputFile]:
    """Expand corpus entries (files, directories, builtin corpora) into files, in order.

    With `max_bytes`, whole files are taken in order until their total size reaches it.

    Raises:
        SpecError: an entry does not exist or holds no Parquet files.
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
        if is_remote(entry):
            found = list_files(entry, ".parquet")  # StorageError names the URI and cause
            if not found:
                problems.append(f"`{key}`: {entry} holds no .parquet files.")
            files.extend(InputFile(f.uri, f.size, f.mtime_ns, "parquet") for f in found)
            continue
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                problems.append(f"`{key}`: directory {entry} holds no .parquet files.")
            files.extend(_input_file(p, "parquet") for p in found)
        elif path.is_file():
            files.append(_input_file(path, "parquet"))
        else:
            problems.append(f"`{key}`: {entry} does not exist; give a Parquet file or directory.")
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
    """Raise a SpecError naming the available columns when a Parquet file lacks one of
    `columns` (column -> the spec key that names it)."""
    for f in files:
        if f.kind != "parquet":
            continue
        try:
            with open_input(f.path) as handle:
                names = pq.read_schema(handle).names
        except (pa.ArrowInvalid, OSError) as exc:
            raise SpecError(key, f"{f.path} is not a readable Parquet file: {exc}.") from None
        for column, spec_key in columns.items():
            if column not in names:
                raise SpecError(
                    spec_key,
                    f"{f.path} has no column {column!r}; its columns are {', '.join(names)}. "
                    f"Set `{spec_key}` to the right one.",
                )
