"""Storage URIs against real protocol servers on 127.0.0.1: moto (S3), gcp-storage-emulator
(GCS) and Azurite (Azure Blob)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raygen.cluster.errors import StorageError
from raygen.cluster.storage import list_files, resolve


def put_parquet(uri: str, texts: list[str]) -> None:
    fs, path = resolve(uri)
    pq.write_table(pa.table({"text": texts}), path, filesystem=fs)


def test_lists_parquet_files_under_a_prefix(cloud_base):
    put_parquet(f"{cloud_base}/corpus/b.parquet", ["x"])
    put_parquet(f"{cloud_base}/corpus/a.parquet", ["y"])
    found = list_files(f"{cloud_base}/corpus", ".parquet")
    assert [f.uri for f in found] == [
        f"{cloud_base}/corpus/a.parquet",
        f"{cloud_base}/corpus/b.parquet",
    ]
    assert all(f.size > 0 for f in found)
    assert [f.uri for f in list_files(f"{cloud_base}/corpus/a.parquet", ".parquet")] == [
        f"{cloud_base}/corpus/a.parquet"
    ]


def test_missing_bucket_names_the_bucket_and_endpoint(s3_endpoint):
    with pytest.raises(StorageError) as info:
        list_files("s3://no-such-bucket-here/x", ".parquet")
    assert str(info.value) == (
        f"s3://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist at "
        f"{s3_endpoint}; create it or fix the URI."
    )


def test_unreachable_endpoint(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="cannot reach the endpoint http://127.0.0.1:9"):
        list_files("s3://any-bucket/x", ".parquet")


def test_a_uri_raygen_cannot_open_is_named():
    with pytest.raises(StorageError) as info:
        list_files("nosuch://bucket/key", ".parquet")
    assert str(info.value) == (
        "nosuch://bucket/key: raygen reads local paths and s3://, gs://, abfs:// URIs; fix the URI."
    )


def test_local_missing_path(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list_files(str(tmp_path / "nope"), ".parquet")


def test_text_files_append_and_directories_round_trip(cloud_base, tmp_path):
    from raygen.cluster.storage import (
        append_line,
        exists,
        join,
        local_copy,
        read_text,
        upload_dir,
        write_text,
    )

    base = f"{cloud_base}/run"
    assert read_text(join(base, "result.json")) is None
    write_text(join(base, "result.json"), '{"ok": 1}')
    assert read_text(join(base, "result.json")) == '{"ok": 1}'
    append_line(join(base, "log.jsonl"), "a")
    append_line(join(base, "log.jsonl"), "b")
    assert read_text(join(base, "log.jsonl")) == "a\nb\n"

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"123")
    upload_dir(str(src), join(base, "model"))
    assert exists(join(base, "model", "sub", "w.bin"))
    first = local_copy(join(base, "model"), str(tmp_path / "cache"))
    assert (Path(first) / "sub" / "w.bin").read_bytes() == b"123"
    assert local_copy(join(base, "model"), str(tmp_path / "cache")) == first  # cached
    write_text(join(base, "model", "config.json"), '{"changed": true}')
    assert local_copy(join(base, "model"), str(tmp_path / "cache")) != first  # new content


def test_a_remote_directory_is_downloaded_once_into_raygens_cache(
    cloud_base, tmp_path, monkeypatch
):
    from raygen.cluster.storage import local_copy, write_text

    monkeypatch.setenv("RAYGEN_CACHE", str(tmp_path / "cache"))
    write_text(f"{cloud_base}/model/config.json", "{}")
    local = local_copy(f"{cloud_base}/model")
    assert local.startswith(str(tmp_path / "cache"))
    assert Path(local, "config.json").read_text() == "{}"
    assert local_copy(f"{cloud_base}/model") == local  # unchanged: not fetched again


def test_azure_credentials_never_travel_with_its_filesystem(azure_endpoint):
    """What raygen hands Ray (pickled into tasks, Train's and Tune's run state) names the
    account, not its key: each process finds the key in its own environment."""
    import pickle

    from raygen.cluster.storage import AZURITE_KEY, ray_location

    path, fs = ray_location("abfs://cont@devstoreaccount1.dfs.core.windows.net/runs")
    assert path == "cont/runs"
    blob = pickle.dumps(fs)
    assert AZURITE_KEY.encode() not in blob and b"devstoreaccount1" in blob
    assert pickle.loads(blob).get_file_info("cont").type is not None


def test_an_azure_uri_without_an_account_names_the_fix(monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    with pytest.raises(StorageError) as info:
        list_files("abfs://data/corpus", ".parquet")
    assert str(info.value) == (
        "abfs://data/corpus: names no storage account; write "
        "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH, or set "
        "AZURE_STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_CONNECTION_STRING)."
    )
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
    from raygen.cluster.storage import resolve

    assert resolve("abfs://data/corpus")[1] == "data/corpus"


def test_uri_of_puts_back_what_ray_leaves_out():
    from raygen.cluster.storage import uri_of

    azure = "abfs://c@acct.dfs.core.windows.net/runs"
    assert uri_of(azure, "c/runs/x/checkpoint_1") == (
        "abfs://c@acct.dfs.core.windows.net/runs/x/checkpoint_1"
    )
    assert uri_of("gs://b/runs", "b/runs/x") == "gs://b/runs/x"
    assert uri_of("/local/runs", "/local/runs/x") == "/local/runs/x"


@pytest.fixture(scope="module")
def authenticating_s3(s3_endpoint):
    """A second moto server that checks credentials (IAM), in its own process.

    The first 4 requests are let through to set it up: a user `reader` with an access key
    and no permissions, and a bucket `locked`. Returns (endpoint, reader's key id, secret).
    """
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    options = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    iam = boto3.client("iam", **options)
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    boto3.client("s3", **options).create_bucket(Bucket="locked")
    yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    server.terminate()
    server.wait(timeout=10)


@pytest.mark.parametrize(
    ("credentials", "cause"),
    [
        ("reader", "access denied; check that the credentials may read/write this bucket"),
        (("AKIAIOSFODNN7EXAMPLE", "wrong"), "credentials rejected; check AWS_ACCESS_KEY_ID"),
        (None, "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ],
    ids=["access-denied", "unknown-key", "no-credentials"],
)
def test_credential_problems_are_named(authenticating_s3, monkeypatch, credentials, cause):
    endpoint, key_id, secret = authenticating_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a cloud's IMDS
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    if credentials is None:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    else:
        key, value = (key_id, secret) if credentials == "reader" else credentials
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
    with pytest.raises(StorageError) as info:
        list_files("s3://locked/corpus", ".parquet")
    assert str(info.value).startswith(f"s3://locked/corpus: {cause}")


def test_a_missing_gcs_bucket_or_azure_container_is_named(gcs_endpoint, azure_endpoint):
    with pytest.raises(StorageError) as info:
        list_files("gs://no-such-bucket-here/x", ".parquet")
    assert str(info.value) == (
        f"gs://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist at "
        f"{gcs_endpoint}; create it or fix the URI."
    )
    uri = "abfs://nocontainer@devstoreaccount1.dfs.core.windows.net/x"
    with pytest.raises(StorageError) as info:
        list_files(uri, ".parquet")
    assert str(info.value) == (
        f"{uri}: container 'nocontainer' does not exist at {azure_endpoint}/devstoreaccount1; "
        "create it or fix the URI."
    )


AZURE_FIX = (
    "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN), "
    "or sign in with `az login` or a managed identity."
)


def test_azure_credential_problems_are_named(azure_endpoint, monkeypatch):
    from raygen.cluster.storage import AZURITE_KEY

    uri = "abfs://data@devstoreaccount1.dfs.core.windows.net/x"
    wrong = os.environ["AZURE_STORAGE_CONNECTION_STRING"].replace(AZURITE_KEY, "a2V5" * 22)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", wrong)
    with pytest.raises(StorageError) as info:
        list_files(uri, ".parquet")
    assert str(info.value) == f"{uri}: credentials rejected; check {AZURE_FIX}"

    # No key and no identity: Azure's default credential chain finds nothing.
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_ID", "AZURE_TENANT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1")
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9")  # no managed identity
    with pytest.raises(StorageError) as info:
        list_files("abfs://data/x", ".parquet")
    assert str(info.value) == f"abfs://data/x: no credentials found; set {AZURE_FIX}"


def test_gcs_without_credentials_says_so_at_once(monkeypatch, tmp_path):
    import time

    from raygen.cluster import storage

    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # not a Google Cloud machine
    storage._gcs_credentials_found.cache_clear()
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as info:
            list_files("gs://bucket/x", ".parquet")
    finally:
        storage._gcs_credentials_found.cache_clear()
    assert str(info.value) == (
        "gs://bucket/x: no credentials found; set GOOGLE_APPLICATION_CREDENTIALS to a service "
        "account key file (or run `gcloud auth application-default login`) for Google Cloud "
        "Storage."
    )
    assert time.monotonic() - started < 5  # not a minute of retries


def test_a_remote_files_content_id_changes_when_it_is_rewritten(cloud_base):
    import time

    from raygen.cluster.storage import content_id, write_text

    uri = f"{cloud_base}/data/part-0.jsonl"
    write_text(uri, '{"text": "a"}\n')
    first = content_id(uri)
    assert content_id(uri) == first
    time.sleep(1.1)  # object stores keep modification times to the second
    write_text(uri, '{"text": "b"}\n')
    assert content_id(uri) != first
    with pytest.raises(StorageError, match="does not exist"):
        content_id(f"{cloud_base}/data/missing.jsonl")
