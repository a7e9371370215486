"""Storage URIs against a real S3 protocol server (moto on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.errors import StorageError
from cluster.storage import forwarded_env, list_files, resolve


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


def test_local_missing_path(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list_files(str(tmp_path / "nope"), ".parquet")


def test_credentials_are_forwarded_from_the_environment(s3_endpoint):
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == s3_endpoint
    assert env["AWS_ACCESS_KEY_ID"] == os.environ["AWS_ACCESS_KEY_ID"]


def test_text_files_append_and_directories_round_trip(bucket, tmp_path):
    from cluster.storage import (
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
