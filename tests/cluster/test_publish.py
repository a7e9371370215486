"""Directories published whole, and never deleting what raygen did not write: locally and
on the S3 test server."""

from __future__ import annotations

from pathlib import Path

import pytest

from raygen.cluster import publish
from raygen.cluster.storage import exists, join, read_text, write_text


def _writer(files: dict[str, str]):
    def write(out: str) -> None:
        for name, text in files.items():
            Path(out, name).parent.mkdir(parents=True, exist_ok=True)
            Path(out, name).write_text(text)

    return write


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/runs/out"


def test_a_publish_replaces_raygens_own_directory_whole(where):
    publish.publish_dir(where, "model", _writer({"a.txt": "1", "sub/b.txt": "2"}))
    assert publish.state(where) == "complete"
    marker = publish.read_marker(where)
    assert marker["kind"] == "model" and marker["files"] == {"a.txt": 1, "sub/b.txt": 1}
    publish.publish_dir(where, "model", _writer({"c.txt": "33"}))
    assert read_text(join(where, "c.txt")) == "33"
    assert not exists(join(where, "a.txt")) and not exists(join(where, "sub/b.txt"))
    assert publish.read_marker(where)["files"] == {"c.txt": 2}


def test_a_directory_raygen_did_not_write_is_refused_and_left_intact(where):
    write_text(join(where, "thesis.tex"), "years of work")
    with pytest.raises(publish.NotOurs) as info:
        publish.publish_dir(where, "model", _writer({"x": "y"}), key="--out")
    assert "`--out`" in str(info.value) and "was not written by raygen" in str(info.value)
    assert read_text(join(where, "thesis.tex")) == "years of work"
    with pytest.raises(publish.NotOurs):
        publish.begin(where, "data.prepared")
    assert read_text(join(where, "thesis.tex")) == "years of work"
    assert publish.state(where) == "foreign"


def test_a_write_cut_off_half_way_is_seen_as_such(where):
    publish.publish_dir(where, "prepared-data", _writer({"old.parquet": "o"}))
    publish.begin(where, "data.prepared")  # an in-place writer starts...
    write_text(join(where, "part-0.parquet"), "half")  # ...and is killed here
    assert publish.state(where) == "interrupted"
    with pytest.raises(publish.StorageError, match="is incomplete: raygen was writing it"):
        publish.require_complete(where, "the model", "export it again.")
    assert not exists(join(where, "old.parquet"))  # what it replaced went first
    publish.begin(where, "data.prepared")  # ours: a new write may clear it
    write_text(join(where, "part-0.parquet"), "whole")
    publish.finish(where, "prepared-data")
    assert publish.state(where) == "complete"
    assert publish.read_marker(where)["files"] == {"part-0.parquet": 5}


def test_a_failing_local_publish_leaves_the_old_directory(tmp_path):
    target = str(tmp_path / "model")
    publish.publish_dir(target, "model", _writer({"weights": "old"}))

    def broken(out: str) -> None:
        Path(out, "weights").write_text("new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        publish.publish_dir(target, "model", broken)
    assert Path(target, "weights").read_text() == "old"
    assert publish.state(target) == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary copy left


def test_a_directory_without_marks_is_readable_as_it_is(tmp_path):
    """A model someone saved with save_pretrained: raygen reads it, but will not replace it."""
    Path(tmp_path, "config.json").write_text("{}")
    publish.require_complete(str(tmp_path), "the model", "")
    assert not publish.is_ours(str(tmp_path))
    assert publish.is_ours(str(tmp_path / "nothing-here"))
