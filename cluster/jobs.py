"""Run raygen commands on a Ray cluster through Ray's Jobs API, and follow them there.

A submission uploads the project (the working directory, without `.git`, `.venv`, run
outputs and whatever `.gitignore`/`.rayignore` leave out) and runs the same `raygen`
command on the cluster's head. Nothing of this process's environment goes with it unless
named with `--env`: Ray keeps a job's environment variables in its GCS and shows them to
anyone who can read the Jobs API, so credentials belong on the nodes (instance profiles,
workload identity, the nodes' own environment), not in a submission.
"""

from __future__ import annotations

import os
import shlex
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raygen.cluster.errors import ClusterError

JOBS_ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # Ray's own name for the Jobs API address
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
# Never uploaded: version control, environments, caches and run outputs (they can be GBs).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "benchmarks/results",
]
# Forwarded to the job when set here: storage credentials and endpoints.
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def jobs_address(address: str | None) -> str:
    """The Jobs API's URL: `address`, else $RAY_API_SERVER_ADDRESS; `HOST:PORT` gets http://.

    Raises:
        ClusterError: no address given, or not an http(s) URL of the dashboard port.
    """
    address = address or os.environ.get(JOBS_ADDRESS_ENV)
    if not address:
        raise ClusterError(
            "no cluster address: give --address http://HEAD:8265 (the dashboard port; "
            "`raygen cluster dashboard` tunnels it to http://127.0.0.1:8265) or set "
            f"{JOBS_ADDRESS_ENV}."
        )
    if address.startswith("ray://") or address == "auto":
        raise ClusterError(
            f"--address {address}: jobs are submitted to the dashboard's HTTP port, e.g. "
            "http://HEAD:8265, not to a ray:// client address."
        )
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address}: expected http://HEAD:8265.")
    return address.rstrip("/")


def find_token() -> tuple[str | None, str]:
    """The cluster token, looked up where Ray looks: $RAY_AUTH_TOKEN, the file named by
    $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. Returns (token or None, where from)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    path = os.environ.get(TOKEN_PATH_ENV)
    source = f"${TOKEN_PATH_ENV} ({path})" if path else str(DEFAULT_TOKEN_FILE)
    file = Path(path or DEFAULT_TOKEN_FILE).expanduser()
    try:
        token = file.read_text().strip()
    except OSError:
        if path:
            raise ClusterError(
                f"${TOKEN_PATH_ENV} is {path}, which cannot be read; point it at the file "
                "holding the cluster's token."
            ) from None
        return None, "nowhere"
    return token or None, source


_TOKEN_HELP = (
    "Get the token on the head node (`ray get-auth-token`, or `raygen cluster attach` then "
    f"`cat ~/.ray/auth_token`) and set {TOKEN_ENV}, or store it in ~/.ray/auth_token."
)


@contextmanager
def _explained(address: str) -> Iterator[None]:
    """Turn the Jobs API's connection and authentication failures into ClusterErrors."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        token, source = find_token()
        if token is None or "Authentication required" in str(exc):
            raise ClusterError(
                f"{address} requires a token (Ray token authentication) and none was "
                f"found. {_TOKEN_HELP}"
            ) from None
        raise ClusterError(
            f"{address} refused the token from {source}: it is not this cluster's. {_TOKEN_HELP}"
        ) from None
    except (ConnectionError, requests.RequestException) as exc:
        raise ClusterError(f"cannot reach the Jobs API at {address}: {exc}") from None


def client(address: str | None) -> tuple[Any, str]:
    """(a JobSubmissionClient sending the token when there is one, the Jobs API's URL)."""
    url = jobs_address(address)
    _check_port(url)
    from ray.job_submission import JobSubmissionClient

    token, _ = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _explained(url):
        return JobSubmissionClient(url, headers=headers), url


def _check_port(url: str, timeout_s: float = 5.0) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(
            f"nothing answers at {url} ({exc.strerror or exc}). Check the head's address and "
            "that the dashboard runs (port 8265); from outside the cluster's network, open "
            "a tunnel with `raygen cluster dashboard --config CLUSTER.yaml`."
        ) from None


def upload_limit() -> int:
    """Ray's limit on an uploaded working_dir (its gRPC message size), in bytes."""
    from ray._private.ray_constants import GRPC_CPP_MAX_MESSAGE_SIZE

    limit = os.environ.get("RAY_max_grpc_message_size")  # noqa: SIM112 - Ray's own name
    return int(limit or GRPC_CPP_MAX_MESSAGE_SIZE)


def package(working_dir: Path, excludes: list[str]) -> tuple[int, list[tuple[int, str]]]:
    """What Ray would upload for `working_dir`, zipped by Ray's own packager (same ignore
    rules): its size in bytes and its files as (compressed size, path), largest first."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import _zip_files

    with tempfile.TemporaryDirectory(prefix="raygen-package-") as tmp:
        zipped = Path(tmp, "package.zip")
        _zip_files(str(working_dir), excludes, str(zipped), include_gitignore=True)
        with ZipFile(zipped) as archive:
            files = [(i.compress_size, i.filename) for i in archive.infolist()]
        return zipped.stat().st_size, sorted(files, reverse=True)


def check_package(working_dir: Path, excludes: list[str], required: list[str]) -> int:
    """The upload's size in bytes, after checking the `required` files are in it.

    Raises:
        ClusterError: above Ray's limit (naming the largest files and how to leave them
            out), or a required file is left out by the ignore rules.
    """
    size, files = package(working_dir, excludes)
    names = {name for _, name in files}
    for path in required:
        if path not in names:
            raise ClusterError(
                f"{path} would not be uploaded: .gitignore, .rayignore or raygen's excludes "
                f"({', '.join(excludes)}) leave it out. Move it elsewhere in {working_dir}."
            )
    largest = files[:5]
    limit = upload_limit()
    if size >= limit:
        biggest = ", ".join(f"{name} ({_mib(n)})" for n, name in largest)
        raise ClusterError(
            f"the working directory {working_dir} packs to {_mib(size)}, over Ray's upload "
            f"limit of {_mib(limit)}. Largest: {biggest}. Keep data and models on shared "
            "storage (s3://...) and list large local files in .rayignore (or .gitignore)."
        )
    return size


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def forwarded_env(names: list[str] | None = None) -> dict[str, str]:
    """The job's environment variables: exactly the `names` given with --env (Ray stores
    them in its GCS and returns them through the Jobs API)."""
    missing = [n for n in names or [] if n not in os.environ]
    if missing:
        raise ClusterError(
            f"--env {', '.join(missing)}: not set in this environment, nothing to forward."
        )
    return {name: os.environ[name] for name in names or []}


def submit(
    command: list[str],
    address: str | None,
    working_dir: Path,
    env_names: list[str] | None = None,
    required: list[str] | None = None,
) -> dict[str, Any]:
    """Submit `raygen <command>` to run on the cluster, from the uploaded `working_dir`.

    Args:
        required: files (relative to `working_dir`) the command reads: the spec.

    Returns:
        {"job_id", "address", "entrypoint", "upload_bytes", "env"} (env: the names only).

    Raises:
        ClusterError: no address, unreachable, token missing or refused, upload too large.
    """
    jobs, url = client(address)
    size = check_package(working_dir, EXCLUDES, required or [])
    env = forwarded_env(env_names)
    entrypoint = shlex.join(["raygen", *command])
    with _explained(url):
        job_id = jobs.submit_job(
            entrypoint=entrypoint,
            runtime_env={
                "working_dir": str(working_dir),
                "excludes": EXCLUDES,
                "env_vars": env,
            },
            metadata={"submitted_by": "raygen", "command": command[0]},
        )
    return {
        "job_id": job_id,
        "address": url,
        "entrypoint": entrypoint,
        "upload_bytes": size,
        "env": sorted(env),
    }


def follow(address: str | None, job_id: str, on_line: Callable[[str], None]) -> str:
    """Stream a job's logs to `on_line` until it ends; return its final status."""
    import asyncio

    jobs, url = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            for line in chunk.splitlines():
                on_line(line)

    with _explained(url):
        _require_job(jobs, job_id)
        asyncio.run(tail())
        status = str(jobs.get_job_status(job_id).value)
        while status not in TERMINAL:  # the log stream can close just before the status
            time.sleep(0.5)
            status = str(jobs.get_job_status(job_id).value)
    return status


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    jobs, url = client(address)
    with _explained(url):
        details = jobs.list_jobs()
    return [_job_row(d) for d in sorted(details, key=lambda d: d.start_time or 0)]


def job_status(address: str | None, job_id: str) -> dict[str, Any]:
    jobs, url = client(address)
    with _explained(url):
        return _job_row(_require_job(jobs, job_id))


def job_logs(address: str | None, job_id: str) -> str:
    jobs, url = client(address)
    with _explained(url):
        _require_job(jobs, job_id)
        return jobs.get_job_logs(job_id)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask the job to stop; True if it was running."""
    jobs, url = client(address)
    with _explained(url):
        _require_job(jobs, job_id)
        return bool(jobs.stop_job(job_id))


def _require_job(jobs: Any, job_id: str) -> Any:
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise ClusterError(
                f"no job {job_id!r} on this cluster; `raygen jobs list` shows the jobs."
            ) from None
        raise ClusterError(f"the Jobs API could not answer for job {job_id!r}: {exc}") from None


def _job_row(details: Any) -> dict[str, Any]:
    return {
        "job_id": details.submission_id or details.job_id,
        "status": str(details.status.value),
        "entrypoint": details.entrypoint,
        "start_time": details.start_time,
        "end_time": details.end_time,
        "message": details.message,
    }
