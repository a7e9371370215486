"""Storage URIs against a real S3 protocol server (moto on 127.0.0.1)."""

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


def test_lists_parquet_files_under_a_prefix(bucket):
    put_parquet(f"s3://{bucket}/corpus/b.parquet", ["x"])
    put_parquet(f"s3://{bucket}/corpus/a.parquet", ["y"])
    found = list_files(f"s3://{bucket}/corpus", ".parquet")
    assert [f.uri for f in found] == [
        f"s3://{bucket}/corpus/a.parquet",
        f"s3://{bucket}/corpus/b.parquet",
    ]
    assert all(f.size > 0 for f in found)
    assert [f.uri for f in list_files(f"s3://{bucket}/corpus/a.parquet", ".parquet")] == [
        f"s3://{bucket}/corpus/a.parquet"
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


def test_a_uri_pyarrow_cannot_open_is_named():
    with pytest.raises(StorageError, match="nosuch://bucket/key: Unrecognized filesystem"):
        list_files("nosuch://bucket/key", ".parquet")


def test_local_missing_path(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list_files(str(tmp_path / "nope"), ".parquet")


def test_text_files_append_and_directories_round_trip(bucket, tmp_path):
    from raygen.cluster.storage import (
        append_line,
        exists,
        join,
        local_copy,
        read_text,
        upload_dir,
        write_text,
    )

    base = f"s3://{bucket}/run"
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


def test_a_remote_directory_is_downloaded_once_into_raygens_cache(bucket, tmp_path, monkeypatch):
    from raygen.cluster.storage import local_copy, write_text

    monkeypatch.setenv("RAYGEN_CACHE", str(tmp_path / "cache"))
    write_text(f"s3://{bucket}/model/config.json", "{}")
    local = local_copy(f"s3://{bucket}/model")
    assert local.startswith(str(tmp_path / "cache"))
    assert Path(local, "config.json").read_text() == "{}"
    assert local_copy(f"s3://{bucket}/model") == local  # unchanged: not fetched again


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
