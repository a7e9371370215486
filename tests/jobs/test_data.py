"""Data preparation with Ray Data against a fixture corpus whose outcome is counted by hand."""

from __future__ import annotations

import pickle
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raygen.jobs.data.prepare import prepare_data
from raygen.jobs.loader import validate_spec
from raygen.jobs.spec import TrainSpec
from raygen.jobs.validate import validate_train_spec


def doc(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n // 10):
        lines.append(
            " ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(10))
        )
    return "\n".join(lines)


def test_prepare_counts_every_removal(ray_session, tmp_path):
    docs = [doc(i) for i in range(7)]
    near = docs[1].split(" ")
    near[40], near[120] = "zzzzzz", "yyyyyy"
    train = [
        docs[0],
        docs[1],
        docs[2],
        docs[3],
        docs[4],
        docs[0].replace("\n", "\r\n"),
        docs[0],  # exact duplicates once normalized: 2
        " ".join(near),  # near duplicate of docs[1]: 1
        "",
        "   \n ",  # empty: 2
        "hi",  # shorter than min_chars: 1
        doc(99, 2000),  # longer than max_chars: 1
        "=" * 3000 + docs[5][:500],  # repetitive: 1
        "\u200b" * 400 + docs[6][:800],  # mostly non-printable: 1
    ]
    evaluation = [docs[5], docs[6], docs[2]]  # docs[2] also in train: train copy goes
    pq.write_table(pa.table({"body": train}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"body": evaluation}), tmp_path / "eval.parquet")
    raw = {
        "name": "prep",
        "model": {"arch": "gpt2"},
        "data": {
            "train": str(tmp_path / "train.parquet"),
            "eval": str(tmp_path / "eval.parquet"),
            "text_column": "body",
            "seq_len": 32,
            "min_chars": 20,
            "max_chars": 5000,
            "max_repeated_fraction": 0.3,
            "max_non_printable_fraction": 0.1,
            "dedupe": "near",
        },
        "tokenizer": {"train": {"vocab_size": 300}},
        "run": {"storage": str(tmp_path / "runs")},
    }
    spec = validate_train_spec(validate_spec(TrainSpec, raw, "t"), "t")
    stats = prepare_data(spec, str(tmp_path / "prepared"))

    assert stats["rows_in"] == 17
    assert stats["removed_empty"] == 2
    assert stats["removed_too_short"] == 1
    assert stats["removed_too_long"] == 1
    assert stats["removed_repetitive"] == 1
    assert stats["removed_non_printable"] == 1
    assert stats["removed_duplicates"] == 3
    assert stats["removed_near_duplicates"] == 1
    assert stats["train_documents"] == 4  # docs 0, 1, 3, 4
    assert stats["eval_documents"] == 3  # docs 5, 6 and 2
    assert stats["rows_out"] == 7
    assert stats["train_tokens"] == 32 * stats["train_sequences"] > 0
    assert stats["eval_tokens"] == 32 * stats["eval_sequences"] > 0

    # Same inputs and options: up to date. A changed option: prepared again.
    assert prepare_data(spec, str(tmp_path / "prepared")) == stats
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"dedupe": "exact"})})
    again = prepare_data(spec, str(tmp_path / "prepared"))
    assert again["fingerprint"] != stats["fingerprint"]
    assert again["removed_near_duplicates"] == 0 and again["train_documents"] == 5


def _save_tokenizer(out, texts: list[str], vocab_size: int) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eos).save_pretrained(out)


def test_a_tokenizer_replaced_in_place_prepares_the_data_again(ray_session, tmp_path):
    from transformers import AutoTokenizer

    docs = [doc(i) for i in range(12)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "train.parquet")
    tokenizer = tmp_path / "tokenizer"
    _save_tokenizer(tokenizer, docs, 300)
    raw = {
        "name": "tok",
        "model": {"arch": "gpt2"},
        "data": {"train": str(tmp_path / "train.parquet"), "seq_len": 32, "eval_fraction": 0.3},
        "tokenizer": {"path": str(tokenizer)},
        "run": {"storage": str(tmp_path / "runs")},
    }
    spec = validate_train_spec(validate_spec(TrainSpec, raw, "t"), "t")
    prepared = tmp_path / "prepared"
    first = prepare_data(spec, str(prepared))
    assert len(AutoTokenizer.from_pretrained(prepared / "tokenizer")) == 300
    _save_tokenizer(tokenizer, docs, 400)  # the same path, another vocabulary
    second = prepare_data(spec, str(prepared))
    assert second["fingerprint"] != first["fingerprint"]
    assert len(AutoTokenizer.from_pretrained(prepared / "tokenizer")) == 400


def test_prepare_reads_parquet_from_s3(ray_session, bucket, tmp_path):
    from raygen.cluster.storage import resolve

    docs = [doc(i) for i in range(12)]
    fs, path = resolve(f"s3://{bucket}/corpus/part-0.parquet")
    pq.write_table(pa.table({"text": docs + docs[:2]}), path, filesystem=fs)
    raw = {
        "name": "s3prep",
        "model": {"arch": "gpt2"},
        "data": {"train": f"s3://{bucket}/corpus/", "seq_len": 32, "eval_fraction": 0.3},
        "tokenizer": {"train": {"vocab_size": 300}},
        "run": {"storage": str(tmp_path / "runs")},
    }
    spec = validate_train_spec(validate_spec(TrainSpec, raw, "t"), "t")
    stats = prepare_data(spec, str(tmp_path / "prepared"))
    assert stats["rows_in"] == 14
    assert stats["removed_duplicates"] == 2
    assert stats["rows_out"] == 12 and stats["train_tokens"] > 0


def test_s3_input_errors_name_the_uri(ray_session, s3_endpoint, tmp_path):
    from raygen.cluster.errors import StorageError

    raw = {
        "name": "s3bad",
        "model": {"arch": "gpt2"},
        "data": {"train": "s3://missing-bucket-xyz/corpus/"},
        "run": {"storage": str(tmp_path / "runs")},
    }
    with pytest.raises(StorageError, match="s3://missing-bucket-xyz/corpus/: bucket"):
        validate_train_spec(validate_spec(TrainSpec, raw, "t"), "t")


def test_io_errors_inside_ray_tasks_become_storage_errors_and_bugs_stay_bugs():
    from raygen.jobs.data.prepare import _storage_cause

    class TaskError(Exception):  # stands in for Ray's RayTaskError, which has `.cause`
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    io = OSError("When reading s3://b/x.parquet: AWS Error NO_SUCH_KEY\nmore detail")
    assert _storage_cause(TaskError(io)) == "When reading s3://b/x.parquet: AWS Error NO_SUCH_KEY"
    assert _storage_cause(TaskError(KeyError("a bug"))) is None
    # An error whose text carries a worker's traceback: the error it ends with.
    traced = OSError(
        'ray::Write() (pid=1)\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "\x1b[36mOSError: [Errno 28] No space left on device\x1b[0m"
    )
    assert _storage_cause(TaskError(traced)) == "[Errno 28] No space left on device"


def test_exact_dedupe_keeps_the_held_out_copy_then_the_first_group_and_one_of_each():
    """The choice made from the tags alone: no Ray. A file given both as data.train and
    data.eval has equal row hashes in both; the source tells the copies apart."""
    import numpy as np

    from raygen.jobs.data.rows import exact_duplicates, kept_mask, source_row_hash

    rows = pa.array([1, 2, 3, 4, 5, 6], pa.uint64())
    tags = pa.table(
        {
            "hash": ["a", "a", "b", "b", "b", "c"],
            "reason": ["", "", "", "", "", ""],
            "source": ["train", "eval", "train", "train", "train", "train"],
            "group": ["x", "x", "z", "y", "y", "x"],
            "row_hash": rows,
        }
    )
    drop = exact_duplicates(tags)
    kept = tags.filter(kept_mask(tags, drop))
    # a: the eval copy; b: group y, the lower row hash; c: alone.
    assert kept["row_hash"].to_pylist() == [2, 4, 6]

    same_file = pa.table(
        {
            "hash": ["a", "a"],
            "reason": ["", ""],
            "source": ["train", "eval"],
            "row_hash": pa.concat_arrays(
                [source_row_hash(rows[:1], "train"), source_row_hash(rows[:1], "eval")]
            ),
        }
    )
    kept = same_file.filter(kept_mask(same_file, exact_duplicates(same_file)))
    assert kept["source"].to_pylist() == ["eval"]
    assert np.array_equal(source_row_hash(rows, "train"), rows)


def test_packing_gives_the_transformers_tokenizers_ids_joined_with_eos(tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from raygen.jobs.data.text import _TokenizePack
    from raygen.jobs.progress import Counter

    texts = [doc(i, 120) for i in range(6)] + ["Café ☕ naïve — 東京\n\tdef f(x): return x"]
    _save_tokenizer(tmp_path / "tok", texts, 300)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    # A tokenizer saved truncating (or padding) still packs every token of every document.
    tokenizer.backend_tokenizer.enable_truncation(8)
    tokenizer.save_pretrained(tmp_path / "tok")
    groups = ["a", "b", "a", "b", "b", "a", "b"]
    pack = _TokenizePack(str(tmp_path / "tok"), 16, ["a", "b"], Counter(None, "t"))
    pack = pickle.loads(pickle.dumps(pack))  # as Ray ships it to a task
    out = pack(pa.table({"text": texts, "group": groups}))

    eos = tokenizer.eos_token_id
    ids = AutoTokenizer.from_pretrained(tmp_path / "tok")(texts, add_special_tokens=False)
    stream = [t for doc_ids in ids["input_ids"] for t in (*doc_ids, eos)]
    owners = [i for i, doc_ids in enumerate(ids["input_ids"]) for _ in range(len(doc_ids) + 1)]
    n = len(stream) // 16
    assert n > 2 and max(len(d) for d in ids["input_ids"]) > 8
    assert out["input_ids"].to_pylist() == [stream[k * 16 : (k + 1) * 16] for k in range(n)]
    expected_groups = np.array([{"a": 0, "b": 1}[groups[i]] for i in owners[: n * 16]])
    assert (np.concatenate(out["group_ids"].to_pylist()) == expected_groups).all()
