"""The two-pass machinery every preparation shares: each row is tagged in one parallel pass
(its hash, why it would be dropped, its split); what to drop is decided here from the tags
alone; a second pass keeps the rest."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)


def in_eval_split(text: str, eval_fraction: float, seed: int) -> bool:
    """Deterministic held-out choice: the same document always lands in the same split."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") / 2**64 < eval_fraction


def split_of(key: str, source: str, eval_fraction: float, seed: int) -> str:
    """`eval` for everything from data.eval and the held-out share of data.train (chosen by
    a hash of `key`: a document's text, an image's pixel hash), else `train`."""
    if source == "eval" or (eval_fraction > 0 and in_eval_split(key, eval_fraction, seed)):
        return "eval"
    return "train"


def read_columns(ds: Any, columns: list[str]) -> pa.Table:
    """Some (small) columns of a materialized dataset, as one table in this process."""
    import ray

    tables = ray.get(ds.select_columns(columns).to_arrow_refs())
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def kept_mask(tags: pa.Table, drop: np.ndarray) -> np.ndarray:
    """Documents that pass the filters and are not a dropped duplicate copy."""
    reasons = tags["reason"].to_numpy(zero_copy_only=False)
    rows = tags["row_hash"].to_numpy(zero_copy_only=False)
    return (reasons == "") & ~np.isin(rows, drop)


def exact_duplicates(tags: pa.Table) -> np.ndarray:
    """Row hashes of the copies exact dedupe drops. Of each set of documents with one content
    hash the held-out copy stays (no evaluation text in training), else the one of the first
    group name, then of the lowest row hash: the same copy on every run."""
    ok = tags.filter(pc.equal(tags["reason"], ""))
    # Single-threaded: a counting pass over hashes needs no pool, and Acero's threaded
    # group-by can fail when a cloud filesystem's threads have grown Arrow's pools
    # ("thread index N is out of range").
    counts = ok.group_by("hash", use_threads=False).aggregate([("hash", "count")])
    repeated = counts.filter(pc.greater(counts["hash_count"], 1))["hash"]
    copies = ok.filter(pc.is_in(ok["hash"], value_set=repeated))
    groups = copies["group"].to_pylist() if "group" in copies.column_names else None
    order = sorted(
        zip(
            copies["hash"].to_pylist(),
            (s != "eval" for s in copies["source"].to_pylist()),
            groups or [""] * copies.num_rows,
            copies["row_hash"].to_pylist(),
            strict=True,
        )
    )
    drop = [row[-1] for i, row in enumerate(order) if i and order[i - 1][0] == row[0]]
    return np.asarray(drop, np.uint64)


def source_row_hash(rows: pa.Array, source: str) -> pa.Array:
    """A row's identity across both sources: a file given as data.train and data.eval has
    the same row hashes in each."""
    if source == "train":
        return rows
    return pa.array(rows.to_numpy(zero_copy_only=False) ^ np.uint64(0x9E3779B97F4A7C15))


class KeepRows:
    """The second pass: drop filtered documents and duplicate copies; keep `columns`."""

    def __init__(self, drop: np.ndarray, columns: list[str]):
        import ray

        self.drop_ref = ray.put(drop) if len(drop) else None
        self.columns = columns
        self.drop: np.ndarray | None = None  # fetched once per task, not per batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        if self.drop is None:
            self.drop = ray.get(self.drop_ref) if self.drop_ref else np.empty(0, np.uint64)
        return batch.filter(kept_mask(batch, self.drop)).select(self.columns)
