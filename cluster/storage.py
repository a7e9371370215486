"""Storage URIs: local paths and `s3://bucket/prefix` (any S3-compatible store).

Credentials and endpoint come from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL). They are
forwarded to Ray workers and never written anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import StorageError

AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
)


@dataclass(frozen=True)
class FileEntry:
    """One file of a listing: its URI (or absolute path), size and modification time."""

    uri: str
    size: int
    mtime_ns: int


def is_remote(path: str) -> bool:
    return "://" in path


def forwarded_env() -> dict[str, str]:
    """The storage credentials and endpoint of this process, for Ray workers' environment."""
    return {name: os.environ[name] for name in AWS_ENV if os.environ.get(name)}


def resolve(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, ValueError, OSError) as exc:
        raise storage_error(uri, exc) from None


def list_files(uri: str, suffix: str) -> list[FileEntry]:
    """The files under `uri` (itself, if a file) whose names end with `suffix`, sorted.

    Raises:
        StorageError: the path, bucket or endpoint is missing, or access is refused.
    """
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    scheme = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.Directory or is_remote(uri):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        else:
            raise FileNotFoundError(path)
    except (OSError, FileNotFoundError) as exc:
        raise storage_error(uri, exc) from None
    return sorted(
        (
            FileEntry(scheme + i.path, i.size or 0, i.mtime_ns or 0)
            for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix)
        ),
        key=lambda e: e.uri,
    )


def open_input(uri: str):
    """A readable file object for a local path or URI."""
    fs, path = resolve(uri)
    try:
        return fs.open_input_file(path)
    except OSError as exc:
        raise storage_error(uri, exc) from None


def storage_error(uri: str, exc: BaseException) -> StorageError:
    """A StorageError naming the URI and the cause, with what to do about it."""
    text = str(exc)
    upper = text.upper()
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if isinstance(exc, FileNotFoundError) or "PATH DOES NOT EXIST" in upper:
        cause = "does not exist; check the path"
    elif "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        bucket = uri.split("://", 1)[-1].split("/", 1)[0]
        cause = f"bucket {bucket!r} does not exist at {endpoint}; create it or fix the URI"
    elif "ACCESS_DENIED" in upper or "ACCESSDENIED" in upper or "403" in text:
        cause = "access denied; check that the credentials may read/write this bucket"
    elif "NETWORK_CONNECTION" in upper or "CURLCODE" in upper or "CONNECT" in upper:
        cause = f"cannot reach the endpoint {endpoint}; check AWS_ENDPOINT_URL and the network"
    elif any(k in upper for k in ("INVALID_ACCESS_KEY", "SIGNATURE", "CREDENTIAL", "TOKEN")):
        cause = (
            "credentials missing or rejected; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and AWS_SESSION_TOKEN for temporary credentials)"
        )
    else:
        cause = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return StorageError(f"{uri}: {cause}.")
