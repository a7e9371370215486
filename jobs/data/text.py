"""Prepare text for language models: read -> normalize and filter -> split train/eval by
hash -> train the tokenizer (if asked) -> tokenize and pack into `seq_len` blocks ->
Parquet shards. No shuffle: exact duplicates are found from hashes held here."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raygen.cluster.storage import (
    is_remote,
    join,
    list_files,
    local_copy,
    open_input,
    ray_location,
    ray_locations,
    upload_dir,
)
from raygen.jobs.data import chat
from raygen.jobs.data.inputs import CHAT_COLUMNS, InputFile, count_rows, read_file, source_columns
from raygen.jobs.data.rows import (
    KeepRows,
    exact_duplicates,
    kept_mask,
    read_columns,
    source_row_hash,
    split_of,
)
from raygen.jobs.data.text_filters import (
    NUM_PERM,
    band_keys,
    content_hash,
    lsh_bands,
    minhash,
    near_duplicate_drops,
    non_printable_fraction,
    normalize_text,
    repeated_fraction,
)
from raygen.jobs.errors import SpecError
from raygen.jobs.progress import Counter, Progress
from raygen.jobs.spec import DataSpec, TrainSpec

logger = logging.getLogger(__name__)


TOKENIZER_DIR = "tokenizer"
EOS_TOKEN = "<|endoftext|>"
# Documents per tokenize/pack batch: packing drops < seq_len tokens at each batch's end.
_PACK_BATCH_DOCS = 512
# Tokenizing is most of preparation's work: a small corpus is split into up to this many
# tasks per CPU of the cluster, so that every CPU is busy until near the end; each batch
# of at least this many documents and (packing loses < seq_len tokens per batch) about this
# many sequences' worth of text.
_TOKENIZE_TASKS_PER_CPU = 4
_TOKENIZE_BATCH_DOCS = 128
_TOKENIZE_BATCH_SEQUENCES = 32
# Group weighting: the group of documents without a value, and the most groups allowed.
GROUP_MISSING = "(missing)"
MAX_GROUPS = 1000


def prepare_text(
    spec: TrainSpec,
    prepared_dir: str,
    train_files: list,
    eval_files: list,
    fp: str,
    progress: Progress,
) -> dict[str, Any]:
    """Clean and tag every document in one parallel pass; decide what to drop from the tags
    alone (no text) here; drop it in a second pass; tokenize and pack each split.

    No shuffle: exact duplicates are found from the documents' hashes, which this process
    holds for the corpus (about 70 bytes a document: 10M documents take ~0.7 GB).
    """
    d = spec.data
    weighting = spec.train.group_weighting
    group_column = weighting.column if weighting else None
    eval_fraction = 0.0 if eval_files else d.eval_fraction
    rows_in = count_rows(train_files + eval_files)
    sources = [("train", train_files)] + ([("eval", eval_files)] if eval_files else [])
    columns = source_columns(d) | ({group_column: "group"} if group_column else {})
    unit = "conversations" if d.format == "chat" else "documents"
    with progress.stage(f"read and clean {unit}", rows_in) as counter:
        parts = [
            _read_documents(files, columns, f"data.{source}").map_batches(
                _Clean(d, source, eval_fraction, spec.train.seed, counter), batch_format="pyarrow"
            )
            for source, files in sources
        ]
        tagged = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        tagged = tagged.materialize()
    tags = read_columns(tagged, [c for c in _TAGS if c != "group" or weighting])

    reasons = tags["reason"].to_numpy(zero_copy_only=False)
    removed = {
        reason: int((reasons == reason).sum())
        for reason in REMOVAL_REASONS + ((chat.INVALID,) if d.format == "chat" else ())
    }
    drop = exact_duplicates(tags) if d.dedupe != "none" else np.empty(0, np.uint64)
    removed["removed_duplicates"] = len(drop)
    keep = (
        ["text", "split"]
        + (["group"] if weighting else [])
        + (["hash"] if d.dedupe == "near" else [])
    )
    docs = tagged.map_batches(KeepRows(drop, keep), batch_format="pyarrow").materialize()
    kept = tags.filter(kept_mask(tags, drop))
    if d.dedupe == "near":
        docs, near = _remove_near_duplicates(docs, d.near_dup_threshold)
        kept = kept.filter(pc.invert(pc.is_in(kept["hash"], value_set=pa.array(near, pa.string()))))
        removed["removed_near_duplicates"] = len(near)

    splits = kept["split"].to_numpy(zero_copy_only=False)
    rows_train, rows_eval = int((splits == "train").sum()), int((splits == "eval").sum())
    if rows_train == 0:
        raise SpecError(
            "data.train",
            f"no documents left after filtering ({rows_in} read; removed: "
            + ", ".join(f"{k.removeprefix('removed_')} {v}" for k, v in removed.items() if v)
            + "); add data or relax data.min_chars/max_chars and the junk filters.",
        )
    if rows_eval == 0:
        raise SpecError(
            "data.eval_fraction",
            f"no evaluation documents: {rows_train} documents with eval_fraction="
            f"{d.eval_fraction} held out none; raise data.eval_fraction or give data.eval.",
        )
    group_names = _group_names(kept, group_column) if weighting else None

    fewest = _fewest_docs_per_batch(docs, rows_train + rows_eval, d.format, d.seq_len)
    train_docs, train_batch = _spread(
        docs.filter(expr="split == 'train'"), docs.num_blocks(), rows_train, fewest
    )
    eval_docs, eval_batch = _spread(
        docs.filter(expr="split == 'eval'"), docs.num_blocks(), rows_eval, fewest
    )
    tokenizer_dir = join(prepared_dir, TOKENIZER_DIR)
    with tempfile.TemporaryDirectory(prefix="raygen-tokenizer-") as tmp:
        _prepare_tokenizer(spec, train_docs, tmp)
        if is_remote(prepared_dir):
            upload_dir(tmp, tokenizer_dir)
        else:
            shutil.copytree(tmp, tokenizer_dir)

    for split, split_docs, rows, batch_docs in (
        ("train", train_docs, rows_train, train_batch),
        ("eval", eval_docs, rows_eval, eval_batch),
    ):
        with progress.stage(f"tokenize {split} {unit}", rows) as counter:
            if d.format == "chat":
                tokenize = _TokenizeChat(tokenizer_dir, d.seq_len, spec.train.loss_on, counter)
            else:
                tokenize = _TokenizePack(tokenizer_dir, d.seq_len, group_names, counter)
            path, filesystem = ray_location(join(prepared_dir, split))
            split_docs.map_batches(
                tokenize, batch_size=batch_docs, batch_format="pyarrow"
            ).write_parquet(path, filesystem=filesystem)

    stats = {
        "fingerprint": fp,
        "kind": "text",
        "format": d.format,
        "rows_in": rows_in,
        "rows_out": rows_train + rows_eval,
        **removed,
        "train_documents": rows_train,
        "eval_documents": rows_eval,
        "seq_len": d.seq_len,
        "tokenizer": tokenizer_dir,
    }
    for split in ("train", "eval"):
        if d.format == "chat":
            stats.update(_chat_shard_stats(join(prepared_dir, split), split))
            continue
        sequences = sum(
            pq.ParquetFile(open_input(f.uri)).metadata.num_rows
            for f in list_files(join(prepared_dir, split), ".parquet")
        )
        stats[f"{split}_sequences"] = stats[f"{split}_examples"] = sequences
        stats[f"{split}_tokens"] = sequences * d.seq_len
    if weighting:
        train_groups = kept.filter(pc.equal(kept["split"], "train"))["group"].to_pylist()
        stats["groups"] = {
            "column": group_column,
            "names": group_names,
            "train_documents": {name: train_groups.count(name) for name in group_names},
            **{
                f"{split}_tokens": _tokens_per_group(join(prepared_dir, split), group_names)
                for split in ("train", "eval")
            },
        }
    return stats


# What the cleaning pass adds to each document, besides its text: everything deciding
# whether it is kept and where it goes. `row_hash` identifies the row (Ray Data derives it
# from the file and position: the same on every read).
_TAGS = ("hash", "reason", "source", "split", "group", "row_hash")


def _fewest_docs_per_batch(docs: Any, rows: int, data_format: str, seq_len: int) -> int:
    """The fewest documents a tokenize batch should hold: packing loses < seq_len tokens at
    each batch's end, so a batch of plain text should hold ~32 sequences' worth (tokens
    estimated at 4 bytes each). Chat conversations are not packed."""
    if data_format == "chat" or not rows:
        return _TOKENIZE_BATCH_DOCS
    tokens_per_doc = max(1.0, docs.size_bytes() / rows / 4)
    wanted = math.ceil(_TOKENIZE_BATCH_SEQUENCES * seq_len / tokens_per_doc)
    return max(_TOKENIZE_BATCH_DOCS, wanted)


def _spread(split_docs: Any, blocks: int, rows: int, fewest: int) -> tuple[Any, int]:
    """One split's documents in blocks enough to keep every CPU of the cluster (the nodes
    up now) tokenizing to the end, and the documents per tokenize batch.

    Ray Data makes blocks of up to 128 MiB whatever the cluster: a 300 MB corpus would be 3
    tasks however many CPUs there are. `blocks` (of the materialized dataset the split is
    filtered from) is at least the split's; a corpus already in enough blocks is left as
    it is. Each new block holds at least one batch, so each is one task (Ray Data gives a
    task whole batches, joining blocks smaller than one)."""
    from raygen.cluster.connection import total_resources

    cpus = int(total_resources().get("CPU", 1))
    batch = max(_PACK_BATCH_DOCS, fewest)
    wanted = min(_TOKENIZE_TASKS_PER_CPU * cpus, rows // fewest)
    if wanted <= blocks:
        return split_docs, batch
    return split_docs.repartition(wanted).materialize(), min(batch, rows // wanted)


def _group_names(tags: pa.Table, column: str) -> list[str]:
    """The sorted distinct groups of the documents; a group id is an index into it."""
    names = sorted(pc.unique(tags["group"]).to_pylist())
    if len(names) > MAX_GROUPS:
        raise SpecError(
            "train.group_weighting.column",
            f"column {column!r} has {len(names)} distinct values; group weighting is for a "
            f"few groups (at most {MAX_GROUPS}). Choose a coarser column.",
        )
    return names


def _tokens_per_group(split_dir: str, names: list[str]) -> dict[str, int]:
    """Tokens of each group in the packed shards of one split."""
    import ray.data

    def count(batch: pa.Table) -> pa.Table:
        ids = batch["group_ids"].combine_chunks().flatten().to_numpy()
        return pa.table({"counts": [np.bincount(ids, minlength=len(names)).tolist()]})

    path, filesystem = ray_location(split_dir)
    parts = ray.data.read_parquet(path, filesystem=filesystem, columns=["group_ids"]).map_batches(
        count, batch_format="pyarrow"
    )
    total = np.zeros(len(names), dtype=np.int64)
    for row in parts.take_all():
        total += np.asarray(row["counts"], dtype=np.int64)
    return dict(zip(names, total.tolist(), strict=True))


def _read_documents(files: list[InputFile], columns: dict[str, str], key: str) -> Any:
    """A Ray Dataset of the inputs' `columns` (source name -> name here: `text`, or a chat
    data set's `messages` or `prompt` and `response`, and `group`), one row per document
    or conversation, with a `row_hash` identifying it."""
    import ray.data

    parquet = [f.path for f in files if f.kind == "parquet"]
    others = [(f.path, f.kind) for f in files if f.kind in ("jsonl", "arrow")]
    texts = [f.path for f in files if f.kind == "text"]
    renames = {old: new for old, new in columns.items() if old != new}
    parts = []
    # One read per filesystem: Ray Data reads a list of paths through one.
    for paths, filesystem in ray_locations(parquet):
        ds = ray.data.read_parquet(
            paths, filesystem=filesystem, columns=list(columns), include_row_hash=True
        )
        parts.append(ds.rename_columns(renames) if renames else ds)
    if others:
        parts.append(
            ray.data.from_items([{"path": p, "kind": k} for p, k in others]).map_batches(
                _ReadFiles(columns, key), batch_size=1, batch_format="pyarrow"
            )
        )
    if texts:
        parts.append(
            ray.data.from_items([{"path": p} for p in texts]).map_batches(
                _read_text_files, batch_format="pyarrow"
            )
        )
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


class _ReadFiles:
    """Reads JSON Lines and Arrow files whole (one file per batch), renamed as asked."""

    def __init__(self, columns: dict[str, str], key: str):
        self.columns, self.key = columns, key

    def __call__(self, batch: pa.Table) -> pa.Table:
        (path,), (kind,) = batch["path"].to_pylist(), batch["kind"].to_pylist()
        table = read_file(path, kind, list(self.columns), self.key)
        return table.rename_columns([self.columns.get(n, n) for n in table.column_names])


def _read_text_files(batch: pa.Table) -> pa.Table:
    paths = batch["path"].to_pylist()
    texts = [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]
    rows = [
        int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") for p in paths
    ]
    return pa.table(
        {"text": pa.array(texts, pa.large_string()), "row_hash": pa.array(rows, pa.uint64())}
    )


REMOVAL_REASONS = (
    "removed_empty",
    "removed_too_short",
    "removed_too_long",
    "removed_non_printable",
    "removed_repetitive",
    "removed_duplicates",
    "removed_near_duplicates",
)


class _Clean:
    """Normalize each document and tag it: why it is removed ('' when kept), its content
    hash, its source and split (train/eval), and its group and row hash as read."""

    def __init__(self, d: DataSpec, source: str, eval_fraction: float, seed: int, counter: Counter):
        self.d, self.source, self.eval_fraction, self.seed = d, source, eval_fraction, seed
        self.counter = counter

    def reason(self, text: str) -> str:
        d = self.d
        if not text.strip():
            return "removed_empty"
        if len(text) < d.min_chars:
            return "removed_too_short"
        if d.max_chars is not None and len(text) > d.max_chars:
            return "removed_too_long"
        if (
            d.max_non_printable_fraction is not None
            and non_printable_fraction(text) > d.max_non_printable_fraction
        ):
            return "removed_non_printable"
        if (
            d.max_repeated_fraction is not None
            and repeated_fraction(text) > d.max_repeated_fraction
        ):
            return "removed_repetitive"
        return ""

    def conversations(self, batch: pa.Table) -> tuple[list[str], list[str]]:
        """format chat: each row's conversation as canonical JSON, and its removal reason
        (the filters look at what the turns say)."""
        texts, reasons = [], []
        for row in batch.select([c for c in CHAT_COLUMNS if c in batch.column_names]).to_pylist():
            turns = chat.conversation(row)
            if isinstance(turns, str):
                texts.append("")
                reasons.append(chat.INVALID)
                continue
            for turn in turns:
                turn["content"] = normalize_text(turn["content"], self.d.collapse_whitespace)
            texts.append(chat.encode(turns))
            reasons.append(self.reason(chat.said(turns)))
        return texts, reasons

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.d.format == "chat":
            texts, reasons = self.conversations(batch)
        else:
            texts = [
                normalize_text(raw or "", self.d.collapse_whitespace)
                for raw in batch["text"].to_pylist()
            ]
            reasons = [self.reason(t) for t in texts]
        columns = {
            "text": pa.array(texts, pa.large_string()),
            "hash": pa.array([content_hash(t) for t in texts], pa.string()),
            "source": pa.array([self.source] * len(texts), pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "split": pa.array(
                [split_of(t, self.source, self.eval_fraction, self.seed) for t in texts],
                pa.string(),
            ),
            "row_hash": source_row_hash(batch["row_hash"], self.source),
        }
        if "group" in batch.column_names:
            columns["group"] = pa.array(
                [GROUP_MISSING if g is None else str(g) for g in batch["group"].to_pylist()],
                pa.string(),
            )
        self.counter.add(batch.num_rows)
        return pa.table(columns)


def _remove_near_duplicates(docs: Any, threshold: float) -> tuple[Any, set[str]]:
    """Drop all but one document of each group whose MinHash similarity is >= threshold.

    Returns the remaining documents and the content hashes of those dropped."""
    bands, rows = lsh_bands(threshold)

    def signatures(batch: pa.Table) -> pa.Table:
        sigs = np.stack([minhash(t) for t in batch["text"].to_pylist()])
        return pa.table(
            {
                "hash": batch["hash"],
                "sig": pa.FixedSizeListArray.from_arrays(sigs.ravel(), NUM_PERM),
            }
        )

    def keys(batch: pa.Table) -> pa.Table:
        sigs = batch["sig"].combine_chunks().flatten().to_numpy().reshape(-1, NUM_PERM)
        out_keys, out_hash = [], []
        for h, sig in zip(batch["hash"].to_pylist(), sigs, strict=True):
            for key in band_keys(sig, bands, rows):
                out_keys.append(key)
                out_hash.append(h)
        return pa.table({"key": pa.array(out_keys, pa.int64()), "hash": out_hash})

    def star_pairs(group: pa.Table) -> pa.Table:
        members = sorted(set(group["hash"].to_pylist()))
        return pa.table(
            {"a": members[:1] * (len(members) - 1), "b": members[1:]},
            schema=pa.schema([("a", pa.string()), ("b", pa.string())]),
        )

    sigs = docs.map_batches(signatures, batch_format="pyarrow").materialize()
    pairs = {
        (row["a"], row["b"])
        for row in sigs.map_batches(keys, batch_format="pyarrow")
        .groupby("key")
        .map_groups(star_pairs, batch_format="pyarrow")
        .take_all()
    }
    if not pairs:
        return docs, set()
    involved = {h for pair in pairs for h in pair}
    candidate_sigs = {
        row["hash"]: np.asarray(row["sig"], dtype=np.uint32)
        for row in sigs.filter(lambda row: row["hash"] in involved).take_all()
    }
    drops = near_duplicate_drops(sorted(pairs), candidate_sigs, threshold)
    logger.info(
        "Near-duplicates: %d candidate pairs, %d documents dropped.", len(pairs), len(drops)
    )
    return docs.filter(lambda row: row["hash"] not in drops).materialize(), set(drops)


class _TokenizePack:
    """Tokenize documents, join them with EOS and cut the stream into `seq_len` blocks.

    With `group_names`, a parallel `group_ids` column gives each token's document group
    (the EOS after a document belongs to it). A tokenizer with a Rust backend (any "fast"
    one) encodes with its batch encoding without character offsets (`encode_batch_fast`:
    the same ids as calling the transformers tokenizer, ~1.6x faster in the data
    benchmark); each task on its one CPU (Ray runs a task per CPU), tokenizers' own threads
    off whatever the driver's TOKENIZERS_PARALLELISM says.
    """

    def __init__(
        self, tokenizer_dir: str, seq_len: int, group_names: list[str] | None, counter: Counter
    ):
        from transformers import AutoTokenizer

        self.counter = counter
        self.tokenizer = AutoTokenizer.from_pretrained(local_copy(tokenizer_dir))
        self.eos = self.tokenizer.eos_token_id
        self.seq_len = seq_len
        self.group_ids = {name: i for i, name in enumerate(group_names or [])}

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if not self.tokenizer.is_fast:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return [np.asarray(doc, np.int32) for doc in ids]
        encoder = self.tokenizer.backend_tokenizer
        # As the transformers tokenizer's call sets them (the settings do not travel to
        # the task with a pickled tokenizer, or may have been saved otherwise).
        encoder.no_truncation()
        encoder.no_padding()
        encoder.encode_special_tokens = bool(getattr(self.tokenizer, "split_special_tokens", False))
        encodings = encoder.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs = self._encode(batch["text"].to_pylist())
        eos = np.array([self.eos], np.int32)
        stream = np.concatenate([part for doc in docs for part in (doc, eos)] or [eos[:0]])
        n = len(stream) // self.seq_len
        columns = {"input_ids": _blocks(stream, n, self.seq_len)}
        if self.group_ids:
            groups = np.repeat(
                np.array([self.group_ids[g] for g in batch["group"].to_pylist()], np.int16),
                [len(doc) + 1 for doc in docs],
            )
            columns["group_ids"] = _blocks(groups, n, self.seq_len)
        self.counter.add(batch.num_rows)
        return pa.table(columns)


class _TokenizeChat:
    """Render each conversation with the chat template into one right-padded `seq_len`
    sequence: `input_ids`, `targets` (1 where the loss counts the token), and per row its
    real `tokens`, `loss_tokens` and whether it was `truncated`."""

    def __init__(self, tokenizer_dir: str, seq_len: int, loss_on: str, counter: Counter):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local_copy(tokenizer_dir))
        self.render = chat.ChatTokenizer(tokenizer, seq_len, loss_on)
        self.seq_len, self.counter = seq_len, counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.render(chat.decode(text)) for text in batch["text"].to_pylist()]
        n, width = len(rows), self.seq_len
        ids = np.concatenate([r.input_ids for r in rows]) if rows else np.empty(0, np.int32)
        targets = np.concatenate([r.targets for r in rows]) if rows else np.empty(0, np.uint8)
        self.counter.add(batch.num_rows)
        return pa.table(
            {
                "input_ids": _blocks(ids, n, width),
                "targets": _blocks(targets, n, width),
                "tokens": pa.array([r.tokens for r in rows], pa.int32()),
                "loss_tokens": pa.array([int(r.targets.sum()) for r in rows], pa.int32()),
                "truncated": pa.array([r.truncated for r in rows], pa.bool_()),
            }
        )


def _chat_shard_stats(split_dir: str, split: str) -> dict[str, int]:
    """Sequences, real tokens, tokens the loss counts and truncated conversations of one
    split's shards."""
    import ray.data

    path, filesystem = ray_location(split_dir)
    ds = ray.data.read_parquet(
        path, filesystem=filesystem, columns=["tokens", "loss_tokens", "truncated"]
    )
    sequences = ds.count()
    sums = ds.sum(["tokens", "loss_tokens", "truncated"]) if sequences else {}
    return {
        f"{split}_sequences": sequences,
        f"{split}_examples": sequences,
        f"{split}_tokens": int(sums.get("sum(tokens)", 0)),
        f"{split}_loss_tokens": int(sums.get("sum(loss_tokens)", 0)),
        f"{split}_truncated": int(sums.get("sum(truncated)", 0)),
    }


def _blocks(stream: np.ndarray, n: int, seq_len: int) -> pa.FixedSizeListArray:
    """The first n x seq_len items of `stream` as n fixed-size lists."""
    return pa.FixedSizeListArray.from_arrays(stream[: n * seq_len], seq_len)


def _prepare_tokenizer(spec: TrainSpec, train_docs: Any, out_dir: str) -> None:
    """Copy the given/pretrained tokenizer, or train a byte-level BPE on the training docs;
    for chat data, with its chat template (`tokenizer.chat_template`)."""
    tokenizer = _base_tokenizer(spec, train_docs)
    if spec.data.format == "chat":
        try:
            chat.apply_template(tokenizer, spec.tokenizer.chat_template)
        except ValueError as exc:
            raise SpecError("tokenizer.chat_template", str(exc)) from None
    tokenizer.save_pretrained(out_dir)


def _base_tokenizer(spec: TrainSpec, train_docs: Any) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = spec.tokenizer.path or (spec.model.pretrained if not spec.tokenizer.train else None)
    if source:
        tokenizer = AutoTokenizer.from_pretrained(local_copy(source))
        if tokenizer.eos_token is None:
            raise SpecError(
                "tokenizer.path", f"the tokenizer in {source} has no EOS token to join documents."
            )
        return tokenizer

    from tokenizers import ByteLevelBPETokenizer

    train = spec.tokenizer.train
    vocab_size = train.vocab_size if train else 8192
    min_frequency = train.min_frequency if train else 2
    bpe = ByteLevelBPETokenizer()

    def texts():
        for batch in train_docs.iter_batches(batch_size=1024, batch_format="pyarrow"):
            for text in batch["text"].to_pylist():
                yield chat.contents(text) if spec.data.format == "chat" else text

    bpe.train_from_iterator(
        texts(),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    return tokenizer
