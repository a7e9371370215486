"""Storage URIs: local paths and `s3://bucket/prefix` (any S3-compatible store).

Credentials and endpoint come from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL), the
process's own on an embedded Ray (its workers inherit it), the nodes' own on a cluster.
They are never written anywhere, Ray's records included.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from raygen.cluster.errors import StorageError


@dataclass(frozen=True)
class FileEntry:
    """One file of a listing: its URI (or absolute path), size and modification time."""

    uri: str
    size: int
    mtime_ns: int


def is_remote(path: str) -> bool:
    return "://" in path


def resolve(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError
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
        if is_remote(uri):
            # List first: a listing's error says why (e.g. an unknown key); a HEAD's can't.
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            if not infos:
                info = fs.get_file_info(path)
                infos = [info] if info.type == pafs.FileType.File else []
            bucket = path.split("/", 1)[0]
            if not infos and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise OSError(f"NoSuchBucket: {bucket}")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                infos = [info]
            elif info.type == pafs.FileType.Directory:
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


def read_table(uri: str, columns: list[str] | None = None):
    """A Parquet file, or every Parquet file under a directory (in path order), local or
    remote, as one pyarrow Table (of `columns`, default all)."""
    import pyarrow.dataset as pads

    fs, path = resolve(uri)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    except OSError as exc:
        raise storage_error(uri, exc) from None


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
    elif any(k in upper for k in ("INVALID_ACCESS_KEY", "SIGNATURE", "CREDENTIAL", "TOKEN")):
        cause = (
            "credentials rejected; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and AWS_SESSION_TOKEN for temporary credentials)"
        )
    elif is_remote(uri) and not _credentials_configured():
        cause = (
            "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            f"AWS_PROFILE) for {endpoint}"
        )
    elif "ACCESS_DENIED" in upper or "ACCESSDENIED" in upper or "403" in text:
        cause = "access denied; check that the credentials may read/write this bucket"
    elif "NETWORK_CONNECTION" in upper or "CURLCODE" in upper or "CONNECT" in upper:
        cause = f"cannot reach the endpoint {endpoint}; check AWS_ENDPOINT_URL and the network"
    else:
        cause = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return StorageError(f"{uri}: {cause}.")


def _credentials_configured() -> bool:
    """Whether the environment names any AWS credential source (keys, profile, role)."""
    sources = (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    if any(os.environ.get(name) for name in sources):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    if Path(shared).expanduser().is_file():
        return True
    # On cloud VMs the instance role is found through the metadata service.
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"


def content_id(uri: str) -> str:
    """What identifies a file's content: a hash of its bytes (local files), or the object
    store's ETag. Local hashes are remembered by (path, size, modification time, inode) in
    raygen's cache, so unchanged files are read once.

    Raises:
        StorageError: the file cannot be read.
    """
    if is_remote(uri):
        return _etag(uri)
    path = Path(uri).resolve()
    try:
        stat = path.stat()
        key = hashlib.sha256(
            f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}".encode()
        ).hexdigest()[:32]
        cache = cache_root() / "content" / key
        if cache.is_file():
            return cache.read_text()
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise storage_error(uri, exc) from None
    value = "blake2b:" + digest.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{key}.{os.getpid()}.tmp")
        tmp.write_text(value)
        tmp.replace(cache)
    except OSError:  # a read-only cache only costs time
        pass
    return value


def _etag(uri: str) -> str:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except (OSError, ValueError) as exc:
        raise storage_error(uri, exc) from None
    for key in ("ETag", "etag", "md5Hash", "content_md5", "md5"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    # No content tag from this store: size and modification time are what is known.
    return f"stat:{info.get('size')}:{info.get('LastModified') or info.get('mtime')}"


def cache_root() -> Path:
    """raygen's local cache: `$RAYGEN_CACHE`, else `~/.cache/raygen`."""
    return Path(os.environ.get("RAYGEN_CACHE", Path.home() / ".cache" / "raygen"))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or URI."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise storage_error(uri, exc) from None


def read_text(uri: str) -> str | None:
    """The text of a file, or None when it does not exist."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if "does not exist" in str(exc).lower() or "NoSuchKey" in str(exc):
            return None
        raise storage_error(uri, exc) from None


def write_text(uri: str, text: str) -> None:
    """Write a whole file (creating parent directories); object stores replace it atomically."""
    fs, path = resolve(uri)
    try:
        if not is_remote(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
            return
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    except OSError as exc:
        raise storage_error(uri, exc) from None


def append_line(uri: str, line: str) -> None:
    """Append one line (object stores have no append: the object is rewritten)."""
    if not is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with open(uri, "a") as f:
            f.write(line.rstrip("\n") + "\n")
        return
    write_text(uri, (read_text(uri) or "") + line.rstrip("\n") + "\n")


def upload_file(local_path: str, uri: str) -> None:
    """Copy one local file to `uri`."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        pafs.copy_files(
            local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
    except OSError as exc:
        raise storage_error(uri, exc) from None


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory's files to `uri` (replacing what was there)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        if exists(uri):
            fs.delete_dir_contents(path, missing_dir_ok=True)
        pafs.copy_files(
            local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
    except OSError as exc:
        raise storage_error(uri, exc) from None


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local directory with the contents of `uri`: the path itself when local, else a
    download into a cache keyed by the listing's content (size and mtime of each file), so
    an unchanged remote directory is fetched once."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return uri
    files = list_files(uri, "")
    if not files:
        raise StorageError(f"{uri}: holds no files; check the path.")
    key = hashlib.sha256(
        "\n".join(f"{f.uri} {f.size} {f.mtime_ns}" for f in files).encode()
    ).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / "downloads" / key
    if (target / ".complete").is_file():
        return str(target)
    import shutil

    fs, path = resolve(uri)
    partial = target.with_name(key + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(
            path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        (partial / ".complete").write_text(uri)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)  # raygen's own half download
        raise storage_error(uri, exc) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        partial.rename(target)
    except OSError:  # another process finished the same download first
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def download_dir(uri: str, local_dir: str) -> bool:
    """Copy the files under `uri` into `local_dir`; False when there is nothing there."""
    import pyarrow.fs as pafs

    if not exists(uri):
        return False
    fs, path = resolve(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(
            path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    except OSError as exc:
        raise storage_error(uri, exc) from None
    return True


def remove_dir(uri: str) -> None:
    """Delete a directory (or prefix) and everything under it, if it exists."""
    import shutil

    if not is_remote(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    fs, path = resolve(uri)
    try:
        fs.delete_dir_contents(path, missing_dir_ok=True)
    except OSError as exc:
        raise storage_error(uri, exc) from None
