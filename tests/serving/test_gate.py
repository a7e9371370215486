"""The gate's own pieces without Ray: the model hash and the deployment records."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from raygen.jobs.model_hash import model_sha256
from raygen.serving.gate import OVERRIDE, list_records, read_record, write_record


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def _unframed(root: Path) -> str:
    """The hash raygen used before files were framed: name, NUL, contents, concatenated."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_directories_that_fed_the_old_hash_the_same_bytes_hash_differently(tmp_path):
    # "a\0" + "" + "b\0" + "z"  ==  "a\0" + "b\0z": one file's contents can imitate the
    # next file's name.
    one = _write(tmp_path / "one", {"a": b"", "b": b"z"})
    two = _write(tmp_path / "two", {"a": b"b\0z"})
    assert _unframed(one) == _unframed(two)
    assert model_sha256(str(one)) != model_sha256(str(two))
    # Moving bytes between a name and the contents changes it too; equal trees agree.
    three = _write(tmp_path / "three", {"ab": b"", "b": b"z"})
    assert model_sha256(str(three)) != model_sha256(str(one))
    assert model_sha256(str(_write(tmp_path / "four", {"a": b"", "b": b"z"}))) == model_sha256(
        str(one)
    )


def test_the_hash_sees_a_changed_file_of_the_same_size(tmp_path):
    model = _write(tmp_path / "model", {"config.json": b"{}", "weights": b"0123"})
    before = model_sha256(str(model))
    (model / "weights").write_bytes(b"3210")
    assert model_sha256(str(model)) != before


def test_concurrent_records_on_s3_are_all_kept(bucket):
    model = f"s3://{bucket}/runs/code/model"
    with ThreadPoolExecutor(16) as pool:
        names = list(
            pool.map(lambda i: write_record(model, OVERRIDE, {"reason": f"r{i}"}), range(32))
        )
    records = list_records(model)
    assert sorted(r["record"] for r in records) == sorted(names)
    assert sorted(r["reason"] for r in records) == sorted(f"r{i}" for i in range(32))
    assert read_record(model, names[0])["event"] == OVERRIDE
    assert read_record(model, "../model/config.json") is None
