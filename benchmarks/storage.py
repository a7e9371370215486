"""Object storage: pyarrow's own filesystems (what raygen uses) against the fsspec family
(s3fs, gcsfs, adlfs, through pyarrow's FSSpecHandler, as Ray would take them), on each
cloud's protocol server on this machine: moto (S3), gcp-storage-emulator (GCS), Azurite
(Azure Blob).

    python benchmarks/storage.py      # ~1 min

Per filesystem and cloud, in one run, alternating: write and read back one 64 MiB file
(a checkpoint shard's size), write 200 files of 16 KiB (metrics, small shards), list
them, read them back. Reported: MB/s and files/s, best of 3, and pyarrow / fsspec.
The servers run on the same 2 cores as the clients, so the figures are the clients' own
costs plus the servers', not a network's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402

BIG = 64 << 20
SMALL, FILES = 16 << 10, 200


def timed(action, *args: Any) -> float:
    started = time.perf_counter()
    action(*args)
    return time.perf_counter() - started


def write_big(fs: Any, root: str, blob: bytes) -> None:
    with fs.open_output_stream(f"{root}/big.bin") as f:
        f.write(blob)


def read_big(fs: Any, root: str) -> None:
    with fs.open_input_file(f"{root}/big.bin") as f:
        assert len(f.read()) == BIG


def write_small(fs: Any, root: str, small: bytes) -> None:
    for i in range(FILES):
        with fs.open_output_stream(f"{root}/small/{i:04d}.bin") as f:
            f.write(small)


def listing(fs: Any, root: str) -> None:
    import pyarrow.fs as pafs

    found = fs.get_file_info(pafs.FileSelector(f"{root}/small", recursive=True))
    assert len([i for i in found if i.type == pafs.FileType.File]) == FILES


def read_small(fs: Any, root: str) -> None:
    for i in range(FILES):
        with fs.open_input_stream(f"{root}/small/{i:04d}.bin") as f:
            f.read()


def measure(fs: Any, base: str) -> dict[str, float]:
    """The figures of one filesystem under `base` (a bucket or container), best of 3."""
    blob, small = os.urandom(BIG), os.urandom(SMALL)
    best: dict[str, float] = {}
    for attempt in range(3):
        root = f"{base}/bench-{attempt}"
        figures = {
            "write_MBps": BIG / timed(write_big, fs, root, blob) / 1e6,
            "read_MBps": BIG / timed(read_big, fs, root) / 1e6,
            "write_files_per_s": FILES / timed(write_small, fs, root, small),
            "list_s": timed(listing, fs, root),
            "read_files_per_s": FILES / timed(read_small, fs, root),
        }
        for key, value in figures.items():
            better = min if key == "list_s" else max
            best[key] = better(best.get(key, value), value)
    return best


def main() -> None:
    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from raygen.cluster.storage import resolve
    from tests.servers import start_azurite, start_gcs_emulator, stop

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )  # fmt: skip
    gcs, os.environ["STORAGE_EMULATOR_HOST"] = start_gcs_emulator()
    os.environ["GOOGLE_CLOUD_PROJECT"] = "bench"
    # gcsfs would otherwise ask the emulator for the bucket's type over gRPC for a minute.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    azurite, _, os.environ["AZURE_STORAGE_CONNECTION_STRING"] = start_azurite(
        Path(tempfile.mkdtemp(prefix="bench-azurite-"))
    )
    rows = []
    try:
        import adlfs
        import gcsfs
        import s3fs

        name = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=name)
        clouds = {
            "s3": (f"s3://{name}", lambda: s3fs.S3FileSystem()),
            "gs": (f"gs://{name}", lambda: gcsfs.GCSFileSystem(token="anon", project="bench")),
            "abfs": (
                f"abfs://{name}@devstoreaccount1.dfs.core.windows.net",
                lambda: adlfs.AzureBlobFileSystem(),
            ),
        }
        for cloud, (uri, fsspec_fs) in clouds.items():
            native, base = resolve(uri)
            if cloud != "s3":
                native.create_dir(base)
            wrapped = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs()))
            for label, fs in (("pyarrow", native), ("fsspec", wrapped)):
                row = {"cloud": cloud, "filesystem": label, **measure(fs, base)}
                rows.append(row)
                print(row, flush=True)
    finally:
        moto.stop()
        stop(gcs)
        stop(azurite)

    columns = ["cloud", "filesystem", "write_MBps", "read_MBps", "write_files_per_s", "list_s",
               "read_files_per_s"]  # fmt: skip
    print_table(rows, columns)
    ratios = {}
    for cloud in ("s3", "gs", "abfs"):
        native, other = (r for r in rows if r["cloud"] == cloud)
        ratios[cloud] = {
            key: (other[key] / native[key] if key == "list_s" else native[key] / other[key])
            for key in columns[2:]
        }
        print(cloud, "pyarrow / fsspec:", {k: round(v, 2) for k, v in ratios[cloud].items()})
    path = write_results("storage", rows, {"pyarrow_over_fsspec": ratios, "big_bytes": BIG,
                                           "small_bytes": SMALL, "small_files": FILES})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
