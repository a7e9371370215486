"""Training loop overhead: `raygen train` against a minimal hand-written DeepSpeed loop on
the same model, batch and data, inside Ray Train and outside it (one bare process).

    python benchmarks/train_overhead.py            # the full matrix (~20 min on 2 cores)
    python benchmarks/train_overhead.py --quick    # three configurations
    python benchmarks/train_overhead.py --tracking # raygen with MLflow tracking on and off

Every run trains the same GPT-2 (4 layers, 256 wide, the prepared stdlib corpus' 8k
vocabulary, 256-token sequences, micro-batch 8) for the same steps from the same Parquet
shards. Steady state: the median of 5-step window means after 10 warm-up steps, as tokens
per second over all workers.

Each runs as a user would run it, on every core of the machine: `raygen train` with its
defaults; the hand-written loop in Ray Train with `resources_per_worker` giving each worker
its share of the cores (Ray sets PyTorch's threads to a worker's CPUs); the bare loop with
PyTorch's defaults. Start-up: the time to the first 5 steps (raygen's first metrics row),
in phases: `prepare` (raygen: the spec and data fingerprint checks and reading the data
into the object store; hand-written: reading the data), `worker_group` (Ray Train starting
its worker group, until the training function begins), `model` (building it, DeepSpeed's
engine, restoring a checkpoint) and `first_log` (the first 5 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402

MODEL = {"n_layer": 4, "n_embd": 256, "n_head": 4}
SEQ_LEN, MICRO, LR, WINDOW, WARMUP_STEPS = 256, 8, 1e-3, 5, 10
FULL = [(w, z, p) for w in (1, 2) for z in (0, 2, 3) for p in ("fp32", "bf16")]
QUICK = [(1, 0, "fp32"), (2, 2, "fp32"), (2, 3, "bf16")]


def base_spec(storage: Path, prepared: Path, steps: int) -> dict[str, Any]:
    return {
        "name": "bench",
        "model": {"arch": "gpt2", "config": MODEL},
        "data": {
            "train": "builtin:python-stdlib",
            "seq_len": SEQ_LEN,
            "max_bytes": 8_000_000,
            "eval_fraction": 0.02,
            "prepared": str(prepared),
        },
        "tokenizer": {"train": {"vocab_size": 8192}},
        "train": {
            "max_steps": steps,
            "micro_batch_size": MICRO,
            "lr": LR,
            "lr_schedule": "constant",
            "grad_clip": 1.0,
            "weight_decay": 0.0,
            "log_every": WINDOW,
            "eval_every": steps,
            "eval_batches": 1,
            "checkpoint_every": steps,
        },
        "run": {"storage": str(storage), "keep_checkpoints": 1},
    }


def ds_config(world: int, zero: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config a user would write by hand for the same training."""
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO * world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
    }


def window_rate(step_times: list[float], world: int) -> float:
    """Tokens/s (all workers) from the median 5-step window mean after warm-up."""
    windows = [
        statistics.mean(step_times[i : i + WINDOW])
        for i in range(WARMUP_STEPS, len(step_times) - WINDOW + 1, WINDOW)
    ]
    return MICRO * SEQ_LEN * world / statistics.median(windows)


def handwritten_per_worker(config: dict[str, Any]) -> None:
    """The minimal loop a user would write in a Ray Train function."""
    launched_at = time.time()
    import deepspeed
    import ray.train
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**config["model"]))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
        config=config["ds"],
    )
    ready_at = time.time()
    batches = iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=MICRO, drop_last=True)
    )
    times, first_log_at = [], None
    for _ in range(config["steps"]):
        start = time.perf_counter()
        ids = next(batches)["input_ids"].long()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        if len(times) == WINDOW:
            first_log_at = time.time()
    if ray.train.get_context().get_world_rank() == 0:
        # Ray Train V2 keeps only metrics reported with a checkpoint: a file on this machine.
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "step_times": times,
                    "threads": torch.get_num_threads(),
                    "at": [launched_at, ready_at, first_log_at],
                }
            )
        )


def run_handwritten(prepared: Path, model: dict, world: int, zero: int, precision: str, steps: int):
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(tempfile.mkdtemp(prefix="bench-hand-out-")) / "steps.json"
    began = time.time()
    train = ray.data.read_parquet(str(prepared / "train")).materialize()
    prepared_at = time.time()
    trainer = TorchTrainer(
        handwritten_per_worker,
        train_loop_config={
            "model": model,
            "ds": ds_config(world, zero, precision),
            "steps": steps,
            "out": str(out),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=world, resources_per_worker={"CPU": (os.cpu_count() or 1) // world}
        ),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-hand-")),
        datasets={"train": train},
    )
    trainer.fit()
    reported = json.loads(out.read_text())
    points = [began, prepared_at, *reported["at"]]
    names = ("prepare", "worker_group", "model", "first_log")
    startup = {name: points[i + 1] - points[i] for i, name in enumerate(names)}
    startup["total"] = points[-1] - began
    return window_rate(reported["step_times"], world), startup, reported["threads"]


def run_raygen(
    spec: dict, world: int, zero: int, precision: str, tracking: bool = True
) -> tuple[float, dict, int]:
    from raygen.jobs.launch import launch
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.train import metrics as m

    spec = json.loads(json.dumps(spec))
    spec["name"] = f"raygen-w{world}-z{zero}-{precision}"
    spec["scaling"] = {"num_workers": world}
    spec["deepspeed"] = {"zero_stage": zero}
    spec["train"]["precision"] = precision
    if not tracking:
        spec["tracking"] = {"mlflow": False}
    began = time.perf_counter()
    result = launch(validate_spec(TrainSpec, spec, "bench"), fresh=True)
    result["startup"]["launch_s"] = time.perf_counter() - began  # end to end, tracking's wait
    rows = m.read_metrics(result["paths"]["metrics"])
    windows = [r[m.STEP_TIME_S] for r in rows if m.STEP_TIME_S in r and r[m.STEP] > WARMUP_STEPS]
    steady = statistics.median(windows)
    threads = result["attempts"][0]["torch_threads"]
    return MICRO * SEQ_LEN * world / steady, result["startup"], threads


def bare_loop(args: dict[str, Any]) -> None:
    """One process, no Ray, PyTorch's default threads: plain deepspeed.initialize on a
    world of 1, shards read with pyarrow. Prints {"tokens_per_s", "startup_s", "threads"}
    as JSON."""
    started = time.perf_counter()
    import deepspeed
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args["port"]), RANK="0")
    os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**args["model"]))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
        config=ds_config(1, args["zero"], args["precision"]),
    )
    table = pq.read_table(Path(args["prepared"], "train"))
    data = np.asarray(table["input_ids"].combine_chunks().flatten()).reshape(len(table), -1)
    times = []
    for step in range(args["steps"]):
        begin = time.perf_counter()
        ids = torch.from_numpy(data[step * MICRO : (step + 1) * MICRO]).long()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - begin)
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "tokens_per_s": window_rate(times, 1),
                "startup_s": wall - sum(times[WARMUP_STEPS:]),
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_bare(prepared: Path, model: dict, zero: int, precision: str, steps: int):
    from raygen.cluster.simulate import free_port

    args = {
        "prepared": str(prepared),
        "model": model,
        "zero": zero,
        "precision": precision,
        "steps": steps,
        "port": free_port(),
    }
    done = subprocess.run(
        [sys.executable, __file__, "--bare", json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tokens_per_s"], result["startup_s"], result["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three configurations only")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--tracking", action="store_true", help="raygen with MLflow tracking on vs off only"
    )
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_loop(json.loads(args.bare))
        return

    import ray
    from transformers import AutoTokenizer

    from raygen.jobs.data.prepare import prepare_data
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.run_dir import prepared_dir_of
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.validate import validate_train_spec

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    # Prepared once per machine: reruns reuse it (raygen checks its fingerprint).
    spec = base_spec(work / "runs", Path(tempfile.gettempdir(), "raygen-bench-data"), args.steps)
    began = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    ray_start = time.perf_counter() - began
    resolved = validate_train_spec(validate_spec(TrainSpec, spec, "bench"), "bench")
    stats = prepare_data(resolved, prepared_dir_of(resolved))
    vocab = len(AutoTokenizer.from_pretrained(stats["tokenizer"]))
    model = {**MODEL, "vocab_size": vocab, "n_positions": SEQ_LEN}
    # One short Ray Train run first, not counted: the session's first run pays for cold
    # caches (modules read from disk), whichever loop it is.
    run_handwritten(Path(spec["data"]["prepared"]), model, 1, 0, "fp32", WARMUP_STEPS + WINDOW)
    if args.tracking:
        compare_tracking(spec, args.steps, ray_start)
        return
    rows, phases = [], []
    for world, zero, precision in QUICK if args.quick else FULL:
        ours, ours_start, ours_threads = run_raygen(spec, world, zero, precision)
        hand, hand_start, hand_threads = run_handwritten(
            Path(spec["data"]["prepared"]), model, world, zero, precision, args.steps
        )
        row = {
            "workers": world,
            "zero": zero,
            "precision": precision,
            "raygen_tok_s": ours,
            "raygen_threads": ours_threads,
            "hand_ray_tok_s": hand,
            "hand_ray_threads": hand_threads,
            "vs_hand_ray": ours / hand,
            "raygen_first_log_s": ours_start["total"],
            "hand_ray_first_log_s": hand_start["total"],
            "first_log_over_hand_s": ours_start["total"] - hand_start["total"],
        }
        if world == 1:
            bare, bare_start, bare_threads = run_bare(
                Path(spec["data"]["prepared"]), model, zero, precision, args.steps
            )
            row.update(
                bare_tok_s=bare, bare_threads=bare_threads, vs_bare=ours / bare,
                bare_startup_s=bare_start,
            )  # fmt: skip
        rows.append(row)
        config = {"workers": world, "zero": zero, "precision": precision}
        for who, startup in (("raygen", ours_start), ("hand-written in Ray Train", hand_start)):
            phases.append({**config, "loop": who, **startup})
        print(json.dumps(row), flush=True)
    ray.shutdown()
    print()
    print_table(
        rows,
        [
            "workers", "zero", "precision", "raygen_tok_s", "raygen_threads", "hand_ray_tok_s",
            "hand_ray_threads", "vs_hand_ray", "bare_tok_s", "bare_threads", "vs_bare",
        ],
    )  # fmt: skip
    print()
    print_table(
        phases,
        [
            "workers",
            "zero",
            "precision",
            "loop",
            "prepare",
            "worker_group",
            "model",
            "first_log",
            "total",
        ],
    )
    print(
        f"\nRay start: {ray_start:.1f} s; targets: vs_hand_ray >= 0.95, vs_bare >= 0.90 "
        "(1 worker), first log <= the hand-written loop's + 3 s"
    )
    path = write_results(
        "train_overhead",
        rows,
        {
            "model": model,
            "seq_len": SEQ_LEN,
            "micro_batch": MICRO,
            "steps": args.steps,
            "steady_state": f"median of {WINDOW}-step window means after {WARMUP_STEPS} steps",
            "ray_start_s": ray_start,
            "startup_phases_s": phases,
            "targets": {
                "vs_hand_ray": 0.95, "vs_bare_1_worker": 0.90, "first_log_over_hand_s": 3.0,
            },
        },
    )  # fmt: skip
    print(f"wrote {path}")


def compare_tracking(spec: dict[str, Any], steps: int, ray_start: float) -> None:
    """raygen with MLflow tracking (the embedded SQLite store, the default) and without,
    alternated (on, off, off, on, on, off) so drift on the machine falls on both."""
    rows = []
    for world, zero, precision in ((1, 0, "fp32"), (2, 2, "fp32")):
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for tracking in (True, False, False, True, True, False):
            rate, startup, _ = run_raygen(spec, world, zero, precision, tracking)
            runs[tracking].append((rate, startup["launch_s"]))
        on, off = runs[True], runs[False]
        row = {
            "workers": world,
            "zero": zero,
            "precision": precision,
            "tracked_tok_s": statistics.mean(r for r, _ in on),
            "untracked_tok_s": statistics.mean(r for r, _ in off),
            "tracked_launch_s": statistics.mean(t for _, t in on),
            "untracked_launch_s": statistics.mean(t for _, t in off),
        }
        row["tok_s_ratio"] = row["tracked_tok_s"] / row["untracked_tok_s"]
        row["launch_s_added"] = row["tracked_launch_s"] - row["untracked_launch_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    import ray

    ray.shutdown()
    print()
    print_table(
        rows,
        [
            "workers", "zero", "precision", "tracked_tok_s", "untracked_tok_s", "tok_s_ratio",
            "tracked_launch_s", "untracked_launch_s", "launch_s_added",
        ],
    )  # fmt: skip
    path = write_results(
        "tracking_overhead",
        rows,
        {
            "steps": steps,
            "runs": "3 tracked and 3 untracked per configuration, alternated; means",
            "store": "the embedded SQLite store (the default)",
            "steady_state": f"median of {WINDOW}-step window means after {WARMUP_STEPS} steps",
            "ray_start_s": ray_start,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
