"""Storage URIs: local paths, `s3://bucket/prefix` (AWS S3 or any S3-compatible store),
`gs://bucket/prefix` (Google Cloud Storage) and
`abfs://container@account.dfs.core.windows.net/prefix` (Azure Blob Storage and ADLS Gen2;
`abfs://container/prefix` takes the account from the environment).

Each is opened with pyarrow's own filesystem for its cloud (docs/clusters.md, Storage: why,
measured against the fsspec family). Credentials come from each cloud's standard
environment: for S3, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN,
AWS_PROFILE, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL), else the instance role; for GCS,
Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, the
metadata server), STORAGE_EMULATOR_HOST for an emulator; for Azure,
AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY
or AZURE_STORAGE_SAS_TOKEN, else Azure's default credential chain (a service principal's
AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, workload or managed identity, `az
login`). The process's own on an embedded Ray (its workers inherit it), each node's own on
a cluster. They are never written anywhere, Ray's records included: a filesystem raygen
hands Ray carries no credential and finds them again in the environment of the process
that uses it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pyarrow.fs import FileSystemHandler
from pyarrow.lib import ArrowException

from raygen.cluster.errors import StorageError

SCHEMES = ("s3", "gs", "abfs")
RETRY_S = 30  # how long a cloud client retries what fails before the error is raised
# What a filesystem raises: OSError, and for some of Azure's and GCS's errors ArrowException.
FAILURES = (OSError, ArrowException)


@dataclass(frozen=True)
class FileEntry:
    """One file of a listing: its URI (or absolute path), size and modification time."""

    uri: str
    size: int
    mtime_ns: int


def is_remote(path: str) -> bool:
    return "://" in path


def resolve(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI.

    Raises:
        StorageError: a scheme raygen does not read, or a URI missing what it needs.
    """
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    scheme, rest = uri.split("://", 1)
    if scheme not in SCHEMES:
        raise StorageError(
            f"{uri}: raygen reads local paths and {', '.join(s + '://' for s in SCHEMES)} "
            "URIs; fix the URI."
        )
    if scheme == "gs":
        if not os.environ.get("STORAGE_EMULATOR_HOST") and not _gcs_credentials_found():
            raise storage_error(uri, OSError("no credentials"))  # rather than retry for a minute
        return _gcs(), rest.rstrip("/")
    if scheme == "abfs":
        account, path = _azure_path(uri)
        return pafs.PyFileSystem(_AzureFromEnvironment(account)), path
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise storage_error(uri, exc) from None


def _gcs():
    """GCS through pyarrow: Application Default Credentials, or anonymous against the
    emulator at STORAGE_EMULATOR_HOST. Pickled, it holds no credential."""
    names = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")
    return _gcs_for(*(os.environ.get(name) for name in names))


@functools.lru_cache(maxsize=8)
def _gcs_for(emulator: str | None, project: str | None, gcloud_project: str | None):
    import pyarrow.fs as pafs

    options: dict[str, Any] = {"retry_time_limit": timedelta(seconds=RETRY_S)}
    if project or gcloud_project:  # only needed to create buckets (Ray Train may)
        options["project_id"] = project or gcloud_project
    if emulator:
        endpoint = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        options.update(anonymous=True, endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
    return pafs.GcsFileSystem(**options)


AZURITE_KEY = (  # the Azurite emulator's documented development account key
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def _azure_settings() -> dict[str, str]:
    """AZURE_STORAGE_CONNECTION_STRING's settings (`UseDevelopmentStorage=true`: Azurite's
    defaults), else the AZURE_STORAGE_ACCOUNT_* variables'."""
    text = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    settings = dict(
        part.split("=", 1) for part in text.split(";") if "=" in part
    )  # fmt: skip
    if settings.get("UseDevelopmentStorage", "").lower() == "true":
        settings = {
            "AccountName": "devstoreaccount1",
            "AccountKey": AZURITE_KEY,
            "BlobEndpoint": "http://127.0.0.1:10000/devstoreaccount1",
        }
    endpoint_host = urlparse(settings.get("BlobEndpoint", "")).netloc
    if not settings.get("AccountName") and ".blob." in endpoint_host:
        settings["AccountName"] = endpoint_host.split(".", 1)[0]  # a SAS string names none
    for setting, variable in (
        ("AccountName", "AZURE_STORAGE_ACCOUNT_NAME"),
        ("AccountKey", "AZURE_STORAGE_ACCOUNT_KEY"),
        ("SharedAccessSignature", "AZURE_STORAGE_SAS_TOKEN"),
    ):
        if os.environ.get(variable) and not settings.get(setting):
            settings[setting] = os.environ[variable]
    return settings


def _azure_path(uri: str) -> tuple[str, str]:
    """(storage account, container/path) of an abfs:// URI."""
    parsed = urlparse(uri)
    container, at, host = parsed.netloc.rpartition("@")
    if at:
        account = host.split(".", 1)[0]
    else:
        container, account = host, _azure_settings().get("AccountName", "")
    if not account or not container:
        raise StorageError(
            f"{uri}: names no storage account; write "
            "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH, or set "
            "AZURE_STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_CONNECTION_STRING)."
        )
    return account, f"{container}{parsed.path}".rstrip("/")


@functools.lru_cache(maxsize=8)
def _azure(account: str, settings: tuple[tuple[str, str], ...]):
    import pyarrow.fs as pafs

    given = dict(settings)
    options: dict[str, Any] = {}
    if given.get("BlobEndpoint"):
        endpoint = urlparse(given["BlobEndpoint"])
        host = endpoint.netloc
        if host.startswith(f"{account}."):  # Azure's own: account.blob.<suffix>
            blob = host[len(account) :]
            options.update(blob_storage_authority=blob,
                           dfs_storage_authority=blob.replace(".blob.", ".dfs.", 1))  # fmt: skip
        else:  # an emulator, whose paths name the account (http://host:port/account)
            options.update(blob_storage_authority=host, dfs_storage_authority=host)
        options.update(blob_storage_scheme=endpoint.scheme, dfs_storage_scheme=endpoint.scheme)
    elif given.get("EndpointSuffix"):  # a sovereign cloud
        options.update(
            blob_storage_authority=f".blob.{given['EndpointSuffix']}",
            dfs_storage_authority=f".dfs.{given['EndpointSuffix']}",
        )
    if given.get("AccountKey"):
        options["account_key"] = given["AccountKey"]
    elif given.get("SharedAccessSignature"):
        options["sas_token"] = given["SharedAccessSignature"].lstrip("?")
    return pafs.AzureFileSystem(account, **options)


class _AzureFromEnvironment(FileSystemHandler):
    """An Azure account's filesystem (a pyarrow FileSystemHandler) that each process builds
    from its own environment: what it pickles is the account's name, never its key."""

    def __init__(self, account: str):
        self.account = account

    def __reduce__(self):
        return (_AzureFromEnvironment, (self.account,))

    @property
    def fs(self):
        return _azure(self.account, tuple(sorted(_azure_settings().items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _AzureFromEnvironment) and other.account == self.account

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "abfs"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> list:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.fs.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.fs.open_append_stream(path, metadata=metadata)


def uri_of(like: str, path: str) -> str:
    """The URI of `path`, a path inside the filesystem of the URI `like` (Ray and pyarrow
    report paths without the scheme or account); local paths as they are."""
    if not is_remote(like) or is_remote(path):
        return path
    scheme, rest = like.split("://", 1)
    authority = rest.split("/", 1)[0]
    if scheme == "abfs" and "@" in authority:  # the container's account, as in `like`
        container, _, inner = path.partition("/")
        return f"abfs://{container}@{authority.split('@', 1)[1]}/{inner}"
    return f"{scheme}://{path}"


def ray_locations(uris: list[str]) -> list[tuple[list[str], Any]]:
    """`uris` grouped by the filesystem Ray Data reads them through (one per read):
    [(paths, filesystem)], as `ray_location` gives them."""
    groups: dict[str, tuple[list[str], Any]] = {}
    for uri in uris:
        path, filesystem = ray_location(uri)
        scheme = uri.split("://", 1)[0] if is_remote(uri) else "local"
        key = f"abfs {_azure_path(uri)[0]}" if scheme == "abfs" else scheme  # one per account
        groups.setdefault(key, ([], filesystem))[0].append(path)
    return list(groups.values())


def ray_location(uri: str) -> tuple[str, Any]:
    """(path, filesystem) to give Ray Data and Ray Train for a local path or URI: local
    paths and S3 URIs as they are, with no filesystem (Ray opens them itself); GCS and Azure
    through raygen's filesystems, which find credentials and emulators as raygen does."""
    if not is_remote(uri) or uri.startswith("s3://"):
        return uri, None
    return resolve(uri)[::-1]


def list_files(uri: str, suffix: str) -> list[FileEntry]:
    """The files under `uri` (itself, if a file) whose names end with `suffix`, sorted.

    Raises:
        StorageError: the path, bucket or endpoint is missing, or access is refused.
    """
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
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
    except FAILURES as exc:
        raise storage_error(uri, exc) from None
    return sorted(
        (
            FileEntry(uri_of(uri, i.path), i.size or 0, i.mtime_ns or 0)
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
    except FAILURES as exc:
        raise storage_error(uri, exc) from None


def open_input(uri: str):
    """A readable file object for a local path or URI."""
    fs, path = resolve(uri)
    try:
        return fs.open_input_file(path)
    except FAILURES as exc:
        raise storage_error(uri, exc) from None


def storage_error(uri: str, exc: BaseException) -> StorageError:
    """A StorageError naming the URI and the cause, with what to do about it."""
    text = str(exc)
    upper = text.upper()
    scheme = uri.split("://", 1)[0] if is_remote(uri) else ""
    hints = _HINTS.get(scheme, _HINTS["s3"])
    endpoint = hints["endpoint"]()
    if isinstance(exc, FileNotFoundError) or "PATH DOES NOT EXIST" in upper:
        cause = "does not exist; check the path"
    elif any(marker in upper for marker in hints["no_bucket"]):
        named = f"{hints['bucket']} {_bucket_of(uri)!r}"
        cause = f"{named} does not exist at {endpoint}; create it or fix the URI"
    elif any(marker in upper for marker in hints["none"]):
        cause = f"no credentials found; set {hints['credentials']}"
    elif any(marker in upper for marker in hints["rejected"]):
        cause = f"credentials rejected; check {hints['credentials']}"
    elif is_remote(uri) and not hints["configured"]():
        cause = f"no credentials found; set {hints['credentials']} for {endpoint}"
    elif "403" in text or any(k in upper for k in _DENIED):
        bucket = hints["bucket"]
        cause = f"access denied; check that the credentials may read/write this {bucket}"
    elif any(k in upper for k in ("NETWORK_CONNECTION", "CURLCODE", "CONNECT", "UNAVAILABLE")):
        variable = hints["endpoint_variable"]
        cause = f"cannot reach the endpoint {endpoint}; check {variable} and the network"
    else:
        cause = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return StorageError(f"{uri}: {cause}.")


_DENIED = ("ACCESS_DENIED", "ACCESSDENIED", "PERMISSION_DENIED", "AUTHORIZATIONFAILURE")


def _bucket_of(uri: str) -> str:
    """The bucket (S3, GCS) or container (Azure) a URI names."""
    authority = uri.split("://", 1)[-1].split("/", 1)[0]
    return authority.split("@", 1)[0]


def _s3_endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _gcs_endpoint() -> str:
    return os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"


def _azure_endpoint() -> str:
    settings = _azure_settings()
    return settings.get("BlobEndpoint") or f"the Azure account {settings.get('AccountName', '')}"


# What each cloud's errors say, and what to tell the user to set.
_HINTS: dict[str, dict[str, Any]] = {
    "s3": {
        "endpoint": _s3_endpoint,
        "endpoint_variable": "AWS_ENDPOINT_URL",
        "bucket": "bucket",
        "no_bucket": ("NO_SUCH_BUCKET", "NOSUCHBUCKET"),
        "none": (),
        "rejected": ("INVALID_ACCESS_KEY", "SIGNATURE", "CREDENTIAL", "TOKEN"),
        "credentials": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
        "temporary credentials, or AWS_PROFILE)",
        "configured": lambda: _credentials_configured(),  # defined below
    },
    "gs": {
        "endpoint": _gcs_endpoint,
        "endpoint_variable": "STORAGE_EMULATOR_HOST",
        "bucket": "bucket",
        "no_bucket": ("NOSUCHBUCKET", "BUCKET NOT FOUND", "THE SPECIFIED BUCKET DOES NOT EXIST"),
        "none": (),
        "rejected": ("UNAUTHENTICATED", "INVALID_GRANT", "INVALID CREDENTIALS", "OAUTH2"),
        "credentials": "GOOGLE_APPLICATION_CREDENTIALS to a service account key file (or run "
        "`gcloud auth application-default login`)",
        "configured": lambda: _gcs_credentials_found(),  # defined below
    },
    "abfs": {
        "endpoint": _azure_endpoint,
        "endpoint_variable": "the BlobEndpoint of AZURE_STORAGE_CONNECTION_STRING",
        "bucket": "container",
        "no_bucket": ("NOSUCHBUCKET", "CONTAINERNOTFOUND"),
        "none": ("DEFAULTAZURECREDENTIAL",),  # no key, and no identity to sign in with
        "rejected": ("AUTHENTICATIONFAILED", "BASE64", "SIGNATURE"),
        "credentials": "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_KEY (or "
        "AZURE_STORAGE_SAS_TOKEN), or sign in with `az login` or a managed identity",
        "configured": lambda: True,  # Azure's default chain says so itself, at once
    },
}


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


@functools.lru_cache(maxsize=1)
def _gcs_credentials_found() -> bool:
    """Whether Application Default Credentials can be found: a key file, gcloud's login,
    or the metadata server of a Google Cloud machine (asked for at most a second)."""
    import urllib.request

    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    config = os.environ.get("CLOUDSDK_CONFIG", str(Path.home() / ".config" / "gcloud"))
    if (Path(config) / "application_default_credentials.json").is_file():
        return True
    host = os.environ.get("GCE_METADATA_HOST", "169.254.169.254")
    ask = urllib.request.Request(f"http://{host}/", headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(ask, timeout=1) as reply:
            return reply.headers.get("Metadata-Flavor") == "Google"
    except OSError:
        return False


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
    except FAILURES as exc:
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
    """S3's ETag (through s3fs, which reports it); elsewhere the object's size and
    modification time (an overwrite changes the time), through raygen's filesystem."""
    if not uri.startswith("s3://"):
        import pyarrow.fs as pafs

        fs, path = resolve(uri)
        try:
            info = fs.get_file_info(path)
        except FAILURES as exc:
            raise storage_error(uri, exc) from None
        if info.type == pafs.FileType.NotFound:
            raise storage_error(uri, FileNotFoundError(path))
        return f"stat:{info.size}:{info.mtime_ns}"
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except (*FAILURES, ValueError) as exc:
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
    except FAILURES as exc:
        raise storage_error(uri, exc) from None


def read_text(uri: str) -> str | None:
    """The text of a file, or None when it does not exist."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None
    except FAILURES as exc:
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
    except FAILURES as exc:
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
    except FAILURES as exc:
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
    except FAILURES as exc:
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
    except FAILURES as exc:
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
    except FAILURES as exc:
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
    except FAILURES as exc:
        raise storage_error(uri, exc) from None
