"""Data preparation throughput: `raygen data prepare` (Ray Data: normalize, filter, exact
dedupe, split, tokenize, pack) against a plain single-process pyarrow + tokenizers script
doing the same steps, on the same >= 200 MB corpus, at 1 and 2 CPUs.

    python benchmarks/data_prep.py [--mb 200]     # ~15 min on 2 cores

The corpus: the standard library's sources, copied until it reaches the size (each copy
gets its own first line, so copies are distinct documents), with 5% exact duplicates. Both
use the same pretrained tokenizer (trained once beforehand) and 1024-token blocks. Also
measured: how fast the prepared shards stream into training (Ray Data read and
iter_torch_batches) against what training consumes (train_overhead's tokens/s, if run).
The single-process script runs at 1 CPU (tokenizers' threads off: `vs_single` is against
this) and at 2 CPUs (tokenizers' own Rust threads on, what a user gets for free).
Target: >= 1.5x the single-process script on 2 CPUs; input never the bottleneck.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, print_table, write_results  # noqa: E402

SEQ_LEN, FILES = 1024, 16


def build_corpus(out: Path, megabytes: int) -> tuple[int, int]:
    """Parquet files of `megabytes` of Python sources; returns (documents, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [p.read_text(errors="ignore") for p in sorted(root.rglob("*.py"))]
    sources = [s for s in sources if len(s) > 200]
    docs, size, copy = [], 0, 0
    while size < megabytes * 2**20:
        for i, text in enumerate(sources):
            doc = f"# copy {copy} of source {i}\n{text}"
            docs.append(doc)
            size += len(doc.encode())
            if i % 20 == 0:  # 5% exact duplicates
                docs.append(doc)
                size += len(doc.encode())
        copy += 1
    out.mkdir(parents=True)
    step = -(-len(docs) // FILES)
    for k in range(FILES):
        pq.write_table(
            pa.table({"text": docs[k * step : (k + 1) * step]}), out / f"part-{k:02d}.parquet"
        )
    return len(docs), size


def single_process(corpus: Path, tokenizer_dir: str, out: Path) -> None:
    """What a user would write without Ray: read, normalize, dedupe, split, tokenize, pack."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from raygen.jobs.data.rows import in_eval_split
    from raygen.jobs.data.text_filters import normalize_text

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    seen: set[bytes] = set()
    splits: dict[str, list[str]] = {"train": [], "eval": []}
    for path in sorted(corpus.glob("*.parquet")):
        for raw in pq.read_table(path, columns=["text"])["text"].to_pylist():
            text = normalize_text(raw or "")
            if not text.strip():
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            splits["eval" if in_eval_split(text, 0.01, 0) else "train"].append(text)
    out.mkdir(parents=True)
    for split, texts in splits.items():
        for start in range(0, len(texts), 512):
            ids = tokenizer(texts[start : start + 512], add_special_tokens=False)["input_ids"]
            stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
            n = len(stream) // SEQ_LEN
            blocks = pa.FixedSizeListArray.from_arrays(stream[: n * SEQ_LEN], SEQ_LEN)
            pq.write_table(pa.table({"input_ids": blocks}), out / f"{split}-{start:08d}.parquet")


def run_single(corpus: Path, tokenizer_dir: str, out: Path, cpus: int) -> float:
    """The single-process script in a fresh process; with 2 CPUs, tokenizers' own Rust
    threads use them (what a user gets for free). Returns its seconds."""
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "true" if cpus > 1 else "false",
        "RAYON_NUM_THREADS": str(cpus),
    }
    args = json.dumps([str(corpus), tokenizer_dir, str(out)])
    began = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--single", args], env=env, check=True)
    return time.perf_counter() - began


def raygen_spec(corpus: Path, tokenizer_dir: str, prepared: Path) -> dict[str, Any]:
    return {
        "name": "bench-data",
        "model": {"arch": "gpt2"},
        "data": {
            "train": str(corpus),
            "seq_len": SEQ_LEN,
            "eval_fraction": 0.01,
            "dedupe": "exact",
            "prepared": str(prepared),
        },
        "tokenizer": {"path": tokenizer_dir},
    }


def run_raygen(spec: dict[str, Any], cpus: int) -> tuple[float, float]:
    """Prepare in a fresh process on a local Ray of `cpus` CPUs: (seconds, stream tokens/s)."""
    code = f"""
import json, sys, time, ray
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from raygen.jobs.data.prepare import prepare_data
from raygen.jobs.validate import validate_train_spec
from raygen.jobs.loader import validate_spec
from raygen.jobs.spec import TrainSpec
ray.init(num_cpus={cpus}, log_to_driver=False)
raw = json.loads({json.dumps(json.dumps(spec))})
spec = validate_train_spec(validate_spec(TrainSpec, raw, "b"), "b")
began = time.perf_counter()
prepare_data(spec, spec.data.prepared, force=True)
wall = time.perf_counter() - began
ds = ray.data.read_parquet(spec.data.prepared + "/train")
began, tokens = time.perf_counter(), 0
for batch in ds.iter_torch_batches(batch_size=8):
    tokens += batch["input_ids"].numel()
print(json.dumps({{"wall": wall, "stream": tokens / (time.perf_counter() - began)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["wall"], result["stream"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MiB")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        corpus, tokenizer_dir, out = json.loads(args.single)
        single_process(Path(corpus), tokenizer_dir, Path(out))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    documents, size = build_corpus(work / "corpus", args.mb)

    # One tokenizer for both, trained on a slice (as a user would bring their own).
    import pyarrow.parquet as pq
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    sample = pq.read_table(work / "corpus" / "part-00.parquet")["text"].to_pylist()[:2000]
    bpe.train_from_iterator(
        sample, vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tokenizer_dir = str(work / "tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>"
    ).save_pretrained(tokenizer_dir)

    rows = []
    for cpus in (1, 2):
        wall = run_single(work / "corpus", tokenizer_dir, work / f"single-{cpus}", cpus)
        rows.append(
            {"pipeline": "single process (pyarrow + tokenizers)", "cpus": cpus, "wall_s": wall}
        )
    single = rows[0]["wall_s"]
    streams = {}
    for cpus in (1, 2):
        wall, stream = run_raygen(
            raygen_spec(work / "corpus", tokenizer_dir, work / f"prepared-{cpus}"), cpus
        )
        rows.append({"pipeline": "raygen data prepare", "cpus": cpus, "wall_s": wall})
        streams[cpus] = stream
    for row in rows:
        row["docs_per_s"] = documents / row["wall_s"]
        row["mb_per_s"] = size / 2**20 / row["wall_s"]
        row["vs_single"] = single / row["wall_s"]
    print_table(rows, ["pipeline", "cpus", "wall_s", "docs_per_s", "mb_per_s", "vs_single"])
    threaded = rows[1]["wall_s"]
    print(
        f"raygen on 2 CPUs vs the single process with tokenizers' threads on 2 CPUs: "
        f"{threaded / rows[-1]['wall_s']:.2f}x"
    )
    train = RESULTS / "train_overhead.json"
    consumed = None
    if train.exists():
        consumed = max(r["raygen_tok_s"] for r in json.loads(train.read_text())["rows"])
    print(
        f"\nprepared shards stream at {streams[2]:,.0f} tokens/s (2 CPUs)"
        + (f"; training consumed at most {consumed:,.0f} tokens/s" if consumed else "")
    )
    path = write_results(
        "data_prep",
        rows,
        {
            "corpus_mb": size / 2**20,
            "documents": documents,
            "seq_len": SEQ_LEN,
            "stream_tokens_per_s": streams,
            "training_tokens_per_s": consumed,
            "vs_single": "the single process at 1 CPU (TOKENIZERS_PARALLELISM=false)",
            "raygen_2_cpus_vs_single_threaded_2_cpus": threaded / rows[-1]["wall_s"],
            "targets": {"vs_single_2_cpus": 1.5},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
