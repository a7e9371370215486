"""Data preparation throughput: `raygen data prepare` (Ray Data: normalize, filter, exact
dedupe, split, tokenize, pack) against a plain single-process pyarrow + tokenizers script
doing the same steps, on the same >= 200 MB corpus, at 1 and 2 CPUs, and how raygen's
pipeline would scale on a larger cluster.

    python benchmarks/data_prep.py [--mb 200]     # ~22 min on 2 cores

The corpus: the standard library's sources, copied until it reaches the size (each copy
gets its own first line, so copies are distinct documents), with 5% exact duplicates. Both
use the same pretrained tokenizer (trained once beforehand) and 1024-token blocks.

The single-process script, as a user would write it (the transformers tokenizer's
`__call__`), runs on 1 CPU (pinned to one core, tokenizers' threads off: `vs_single` is
against this) and on 2 CPUs with tokenizers' own Rust threads on (what a user gets for
free); and, on 2 CPUs, with the Rust tokenizer's `encode_batch_fast` as raygen uses it, to
show how much of raygen's lead is that call. raygen runs with its defaults: at 1 CPU
pinned to one core, at 2 CPUs on the machine. Each run's stages are timed (read and clean,
the driver's own work, tokenize and pack).

A larger cluster, simulated: raygen prepares again on this machine's 2 CPUs, told the
cluster has N (N = 8, 32), so it splits its work as it would for N CPUs; each stage's
tasks' durations (Ray's task records; two at a time, so not slowed by contention) then
give its parallelism: their sum against the time to run them on N CPUs (longest first,
each on the first CPU free). The projected wall time at N CPUs divides each stage's 1-CPU
time by that and adds the simulated run's own driver work: a projection (no network, no
stragglers), not a measurement.

Also measured: how fast the prepared shards stream into training (Ray Data read and
iter_torch_batches) against what training consumes (train_overhead's tokens/s, if run).
Targets: on 2 CPUs >= 1.0x the single-process script with tokenizers' threads, >= 1.5x the
single-threaded one; input never the bottleneck.
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


def single_process(corpus: Path, tokenizer_dir: str, out: Path, fast: bool) -> None:
    """What a user would write without Ray: read, normalize, dedupe, split, tokenize, pack
    (with `fast`, tokenizing with the Rust tokenizer's `encode_batch_fast`)."""
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
    encoder = tokenizer.backend_tokenizer
    for split, texts in splits.items():
        for start in range(0, len(texts), 512):
            batch = texts[start : start + 512]
            if fast:
                ids = [e.ids for e in encoder.encode_batch_fast(batch, add_special_tokens=False)]
            else:
                ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
            n = len(stream) // SEQ_LEN
            blocks = pa.FixedSizeListArray.from_arrays(stream[: n * SEQ_LEN], SEQ_LEN)
            pq.write_table(pa.table({"input_ids": blocks}), out / f"{split}-{start:08d}.parquet")


def pinned(cpus: int) -> list[str]:
    """A command prefix running on one core when `cpus` is 1 (the machine's 2 otherwise)."""
    return ["taskset", "-c", "0"] if cpus == 1 else []


def run_single(corpus: Path, tokenizer_dir: str, out: Path, cpus: int, fast: bool) -> float:
    """The single-process script in a fresh process; with 2 CPUs, tokenizers' own Rust
    threads use them (what a user gets for free). Returns its seconds."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if cpus > 1 else "false"}
    args = json.dumps([str(corpus), tokenizer_dir, str(out), fast])
    began = time.perf_counter()
    subprocess.run([*pinned(cpus), sys.executable, __file__, "--single", args], env=env, check=True)
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


def run_raygen(spec: dict[str, Any], cpus: int, as_if: int | None = None) -> dict[str, Any]:
    """Prepare in a fresh process on a local Ray of `cpus` CPUs (pinned to one core at 1),
    raygen told the cluster has `as_if` CPUs when given (it splits its work for them; Ray
    runs it on `cpus`). Returns its wall time, each stage's time and its tasks' durations,
    and how fast the shards stream."""
    code = f"""
import json, sys, time, ray
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from benchmarks.data_prep import timed_prepare
import raygen.cluster.connection as connection
ray.init(num_cpus={cpus}, log_to_driver=False)
if {as_if!r}:
    connection.total_resources = lambda: {{**ray.cluster_resources(), "CPU": {as_if!r}}}
print(json.dumps(timed_prepare(json.loads({json.dumps(json.dumps(spec))}), {not as_if})))
"""
    command = [*pinned(cpus), sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    (result,) = [line for line in done.stdout.splitlines() if line.startswith('{"wall"')]
    return json.loads(result)


# The stages of `raygen data prepare` on text, and the Ray task names of their work.
STAGES = {
    "read and clean": "ReadFilesParquetV2->MapBatches(_Clean)",
    "tokenize and pack": "MapBatches(_TokenizePack)->Write",
}


def timed_prepare(raw: dict[str, Any], stream: bool) -> dict[str, Any]:
    """Run in the benchmark's subprocess, connected to Ray: prepare, timing each stage
    (the report's start and end of each), and read the stage tasks' durations."""
    import ray
    from ray.util.state import list_tasks

    from raygen.jobs.data.prepare import prepare_data
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.validate import validate_train_spec

    spec = validate_train_spec(validate_spec(TrainSpec, raw, "bench"), "bench")
    marks: dict[str, list[float]] = {}

    def report(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        marks.setdefault(stage, [now, now])[1] = now

    began = time.perf_counter()
    prepare_data(spec, spec.data.prepared, force=True, report=report)
    wall = time.perf_counter() - began
    read = marks["read and clean documents"]
    tokenize = [marks["tokenize train documents"][0], marks["tokenize eval documents"][1]]
    stages = {
        "read and clean": read[1] - read[0],
        "tokenize and pack": tokenize[1] - tokenize[0],
    }
    stages["driver"] = wall - sum(stages.values())
    time.sleep(5)  # task records reach Ray's state API a little after the tasks end
    tasks = {}
    for stage, name in STAGES.items():
        records = list_tasks(filters=[("name", "=", name)], detail=True, limit=10_000)
        tasks[stage] = [
            (t.end_time_ms - t.start_time_ms) / 1000
            for t in records
            if t.state == "FINISHED" and t.start_time_ms and t.end_time_ms
        ]
    result = {"wall": wall, "stages": stages, "tasks": tasks}
    if stream:
        ds = ray.data.read_parquet(spec.data.prepared + "/train")
        began, tokens = time.perf_counter(), 0
        for batch in ds.iter_torch_batches(batch_size=8):
            tokens += batch["input_ids"].numel()
        result["stream"] = tokens / (time.perf_counter() - began)
    return result


def on_cpus(durations: list[float], cpus: int) -> float:
    """How long `durations` take on `cpus` CPUs, longest first, each to the first free."""
    free = [0.0] * cpus
    for d in sorted(durations, reverse=True):
        free[free.index(min(free))] += d
    return max(free, default=0.0)


def projected(one_cpu: dict[str, Any], simulated: dict[str, Any], cpus: int) -> dict[str, Any]:
    """The wall time at `cpus` CPUs: each stage's 1-CPU time over its parallelism in the
    simulated run (its tasks' total over their time on `cpus` CPUs), plus the simulated
    run's own driver work (which splits the corpus for `cpus` CPUs)."""
    wall, parallelism = simulated["stages"]["driver"], {}
    for stage in STAGES:
        tasks = simulated["tasks"][stage]
        parallelism[stage] = sum(tasks) / on_cpus(tasks, cpus) if tasks else 1.0
        wall += one_cpu["stages"][stage] / parallelism[stage]
    return {"wall": wall, "parallelism": parallelism, "tasks": simulated["tasks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MiB")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        corpus, tokenizer_dir, out, fast = json.loads(args.single)
        single_process(Path(corpus), tokenizer_dir, Path(out), fast)
        return
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
    plain = "single process (pyarrow + tokenizers)"
    for name, cpus, fast in (
        (f"{plain}, threads off", 1, False),
        (f"{plain}, tokenizers' threads", 2, False),
        (f"{plain}, encode_batch_fast + threads", 2, True),
    ):
        wall = run_single(
            work / "corpus", tokenizer_dir, work / f"single-{cpus}-{fast}", cpus, fast
        )
        rows.append({"pipeline": name, "cpus": cpus, "wall_s": wall})
        print(json.dumps(rows[-1]), flush=True)
    runs = {}
    for cpus in (1, 2, 8, 32):
        prepared = work / f"prepared-{cpus}"
        spec = raygen_spec(work / "corpus", tokenizer_dir, prepared)
        runs[cpus] = run_raygen(spec, min(cpus, 2), cpus if cpus > 2 else None)
        if cpus <= 2:
            rows.append(
                {"pipeline": "raygen data prepare", "cpus": cpus, "wall_s": runs[cpus]["wall"]}
            )
        else:
            guess = projected(runs[1], runs[cpus], cpus)
            runs[cpus]["projected"] = guess
            rows.append(
                {
                    "pipeline": "raygen data prepare, projected",
                    "cpus": cpus,
                    "wall_s": guess["wall"],
                }
            )
        print(json.dumps(rows[-1]), flush=True)
    single, threaded = rows[0]["wall_s"], rows[1]["wall_s"]
    for row in rows:
        row["mb_per_s"] = size / 2**20 / row["wall_s"]
        row["vs_single"] = single / row["wall_s"]
        row["vs_threads"] = threaded / row["wall_s"]
    print_table(rows, ["pipeline", "cpus", "wall_s", "mb_per_s", "vs_single", "vs_threads"])

    print("\nraygen's stages (s), and their tasks (measured at 1-2 CPUs; simulated beyond):")
    stage_rows = []
    for cpus, run in runs.items():
        stage_rows.append({"cpus": cpus, **{k: v for k, v in run["stages"].items()}})
        for stage, tasks in run["tasks"].items():
            stage_rows[-1][f"{stage} tasks"] = len(tasks)
            if "projected" in run:
                stage_rows[-1][f"{stage} parallelism"] = run["projected"]["parallelism"][stage]
    print_table(stage_rows, list(dict.fromkeys(k for r in stage_rows for k in r)))

    train = RESULTS / "train_overhead.json"
    consumed = None
    if train.exists():
        consumed = max(r["raygen_tok_s"] for r in json.loads(train.read_text())["rows"])
    stream = runs[2]["stream"]
    print(
        f"\nprepared shards stream at {stream:,.0f} tokens/s (2 CPUs)"
        + (f"; training consumed at most {consumed:,.0f} tokens/s" if consumed else "")
    )
    path = write_results(
        "data_prep",
        rows,
        {
            "corpus_mb": size / 2**20,
            "documents": documents,
            "seq_len": SEQ_LEN,
            "raygen_runs": runs,
            "stream_tokens_per_s": stream,
            "training_tokens_per_s": consumed,
            "vs_single": "the single process on 1 core, tokenizers' threads off",
            "vs_threads": "the single process on 2 CPUs, tokenizers' threads on",
            "targets": {"vs_single_2_cpus": 1.5, "vs_threads_2_cpus": 1.0},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
