"""The storage emulators that are not Python objects, started as processes on 127.0.0.1:
Google Cloud Storage's (gcp-storage-emulator) and Azure Blob Storage's (Azurite, from npm:
`make test` installs it). Used by the tests' fixtures and by the storage benchmark."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from raygen.cluster.simulate import free_port
from raygen.cluster.storage import AZURITE_KEY

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"


def serve(command: list[str], port: int, what: str) -> subprocess.Popen:
    """Start a server listening on 127.0.0.1:`port`; returns once it accepts connections."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{what} did not start: {' '.join(command)}") from None
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    """Stop a server: asked first, killed if it waits on open client connections."""
    process.terminate()
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_gcs_emulator() -> tuple[subprocess.Popen, str]:
    """(process, endpoint for STORAGE_EMULATOR_HOST), data in memory."""
    port = free_port()
    binary = str(Path(sys.executable).parent / "gcp-storage-emulator")
    command = [binary, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    return serve(command, port, "the GCS emulator"), f"http://127.0.0.1:{port}"


def start_azurite(data: Path) -> tuple[subprocess.Popen, str, str]:
    """(process, blob endpoint, AZURE_STORAGE_CONNECTION_STRING of its development
    account), data under `data`."""
    binary = os.environ.get("RAYGEN_AZURITE", str(AZURITE))
    if not Path(binary).exists():
        raise RuntimeError(f"Azurite is not installed at {binary}: `make test` installs it (npm).")
    port = free_port()
    command = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--silent",
               "--location", str(data), "--skipApiVersionCheck"]  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint}/devstoreaccount1;"
    )
    return serve(command, port, "Azurite"), endpoint, connection
