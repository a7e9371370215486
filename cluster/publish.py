"""Directories raygen publishes whole (a model, prepared data), and the rule that it never
deletes a directory it did not write.

A published directory carries `.raygen.json`, written last: what it is, when and by which
raygen, and the name and size of every file it was published with. Locally the directory
is written under a temporary name and renamed into place. Where that cannot be done (object
stores, which cannot rename; Ray Data writing prepared data in place) `.raygen-publishing`
is written first and removed last, so a write cut off half way is seen as such: readers
(`require_complete`) refuse a directory that still has that mark. A directory with neither
mark is not raygen's: readers take it as it is (a model someone saved with
`save_pretrained`), and raygen refuses to replace or delete it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raygen.cluster.errors import StorageError
from raygen.cluster.storage import (
    FAILURES,
    is_remote,
    join,
    list_files,
    read_text,
    resolve,
    storage_error,
)

logger = logging.getLogger(__name__)

MARKER = ".raygen.json"
PUBLISHING = ".raygen-publishing"
MARKS = (MARKER, PUBLISHING)
_TMP, _OLD = ".raygen-tmp-", ".raygen-old-"


class NotOurs(StorageError):
    """A directory raygen would replace or delete holds files raygen did not write."""


def listing(uri: str) -> dict[str, int]:
    """{relative path: size} of every file under `uri` ({} when it does not exist)."""
    try:
        files = list_files(uri, "")
    except StorageError:
        return {}
    root = uri.rstrip("/") if is_remote(uri) else str(Path(uri).resolve())
    return {f.uri[len(root) :].lstrip("/"): f.size for f in files}


def read_marker(uri: str) -> dict[str, Any] | None:
    text = read_text(join(uri, MARKER))
    if text is None:
        return None
    try:
        marker = json.loads(text)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def state(uri: str, files: dict[str, int] | None = None) -> str:
    """`absent` (no files), `complete` (raygen's, published whole), `interrupted`
    (raygen's, cut off while being written or replaced) or `foreign` (not raygen's)."""
    files = listing(uri) if files is None else files
    if not files:
        return "absent"
    if PUBLISHING in files:
        return "interrupted"
    return "complete" if MARKER in files else "foreign"


def is_ours(uri: str, legacy: Callable[[dict[str, int]], bool] | None = None) -> bool:
    """Whether raygen may replace or delete `uri`: absent, empty, or marked as raygen's
    (`legacy` recognizes what older raygen versions wrote without a mark)."""
    files = listing(uri)
    if state(uri, files) != "foreign":
        return True
    return bool(legacy and legacy(files))


def check_ours(uri: str, key: str, legacy: Callable[[dict[str, int]], bool] | None = None) -> None:
    """Raise NotOurs naming `key` and the path when `uri` holds files raygen did not write."""
    if not is_ours(uri, legacy):
        raise NotOurs(
            f"`{key}`: {uri} is not empty and was not written by raygen (it has no "
            f"{MARKER}); raygen never replaces or deletes what it did not write. Give an "
            "empty or new directory, or move those files away."
        )


def require_complete(uri: str, what: str, fix: str) -> None:
    """Refuse a directory raygen began to write and did not finish.

    Raises:
        StorageError: naming `what`, the path and `fix`.
    """
    if state(uri) == "interrupted":
        raise StorageError(
            f"{what} {uri} is incomplete: raygen was writing it and was cut off (no "
            f"{MARKER} matching its files); {fix}"
        )


def _marker(kind: str, files: dict[str, int]) -> str:
    from importlib.metadata import version

    return json.dumps(
        {
            "kind": kind,
            "written_by": f"raygen {version('raygen')}",
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        },
        indent=1,
    )


def mark(uri: str, kind: str) -> None:
    """Mark a directory raygen writes piece by piece (a run) as raygen's, once."""
    from raygen.cluster.storage import write_text

    if read_marker(uri) is None:
        write_text(join(uri, MARKER), _marker(kind, {}))


def publish_dir(
    uri: str,
    kind: str,
    write: Callable[[str], None],
    key: str = "out",
    legacy: Callable[[dict[str, int]], bool] | None = None,
) -> None:
    """Let `write(local_dir)` fill a directory, then publish it as `uri`, whole.

    What was at `uri` is replaced only if raygen wrote it (else NotOurs, naming `key`,
    before anything is written). Readers see the old directory or the new one, never a mix:
    locally by renames; on object stores a reader sees it as interrupted meanwhile.
    """
    check_ours(uri, key, legacy)
    if is_remote(uri):
        with tempfile.TemporaryDirectory(prefix=f"raygen-{kind}-") as tmp:
            write(tmp)
            _upload_whole(tmp, uri, kind)
        return
    final = Path(uri)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    token = uuid.uuid4().hex[:12]
    tmp = final.with_name(final.name + _TMP + token)
    old = final.with_name(final.name + _OLD + token)
    tmp.mkdir()
    try:
        write(str(tmp))
        (tmp / MARKER).write_text(_marker(kind, listing(str(tmp))))
        if final.exists():
            final.replace(old)
        tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


_LEFTOVER_AGE_S = 3600  # younger ones may belong to a publish still under way


def _remove_leftovers(final: Path) -> None:
    """Temporary and replaced copies of `final` that a crash left behind (raygen's own)."""
    for sibling in final.parent.glob(f"{final.name}.raygen-*"):
        if not sibling.name.startswith((final.name + _TMP, final.name + _OLD)):
            continue
        try:
            stale = time.time() - sibling.stat().st_mtime > _LEFTOVER_AGE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(sibling, ignore_errors=True)


def _upload_whole(local: str, uri: str, kind: str) -> None:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    files = listing(local)
    try:
        begin_remote(uri)
        pafs.copy_files(
            local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
        finish_remote(uri, kind, files)
    except FAILURES as exc:
        raise storage_error(uri, exc) from None


def begin_remote(uri: str) -> None:
    """Mark `uri` as being written, then clear what raygen wrote there before (object
    stores; only after `check_ours`)."""
    fs, path = resolve(uri)
    with fs.open_output_stream(f"{path}/{PUBLISHING}") as f:
        f.write(b"raygen is writing this directory\n")
    for name in listing(uri):
        if name != PUBLISHING:
            fs.delete_file(f"{path}/{name}")


def finish_remote(uri: str, kind: str, files: dict[str, int] | None = None) -> None:
    """Write the marker naming every file now under `uri`, then drop the publishing mark."""
    fs, path = resolve(uri)
    if files is None:
        files = {n: s for n, s in listing(uri).items() if n not in MARKS}
    with fs.open_output_stream(f"{path}/{MARKER}") as f:
        f.write(_marker(kind, files).encode())
    fs.delete_file(f"{path}/{PUBLISHING}")


def begin_local(path: str) -> None:
    """Mark a local directory as being written and clear raygen's old files there (for
    writers that must write in place, such as Ray Data's; only after `check_ours`)."""
    root = Path(path)
    if root.exists():
        for child in root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / PUBLISHING).write_text("raygen is writing this directory\n")


def finish_local(path: str, kind: str) -> None:
    root = Path(path)
    files = {n: s for n, s in listing(path).items() if n not in MARKS}
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(_marker(kind, files))
    os.replace(tmp, root / MARKER)
    (root / PUBLISHING).unlink(missing_ok=True)


def begin(uri: str, key: str, legacy: Callable[[dict[str, int]], bool] | None = None) -> None:
    """Start writing `uri` in place: refused (NotOurs, naming `key`) unless raygen wrote
    what is there; then marked as under way and emptied."""
    check_ours(uri, key, legacy)
    if is_remote(uri):
        try:
            begin_remote(uri)
        except FAILURES as exc:
            raise storage_error(uri, exc) from None
    else:
        begin_local(uri)


def finish(uri: str, kind: str) -> None:
    """Declare `uri` complete: its marker lists every file now in it."""
    if is_remote(uri):
        try:
            finish_remote(uri, kind)
        except FAILURES as exc:
            raise storage_error(uri, exc) from None
    else:
        finish_local(uri, kind)
