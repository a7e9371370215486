"""Training loop overhead: `raygen train` against a minimal hand-written DeepSpeed loop on
the same model, batch and data, inside Ray Train and outside it (one bare process).

    python benchmarks/train_overhead.py            # the full matrix (~20 min on 2 cores)
    python benchmarks/train_overhead.py --quick    # three configurations

Every run trains the same GPT-2 (4 layers, 256 wide, the prepared stdlib corpus' 8k
vocabulary, 256-token sequences, micro-batch 8) for the same steps from the same Parquet
shards. Steady state: the median of 5-step window means after 10 warm-up steps, as tokens
per second over all workers. Start-up (everything but the steady steps: Ray Train's worker
group, DeepSpeed init, the first steps, the final checkpoint/export for raygen) is reported
separately. Each Ray Train worker has 1 CPU (Ray sets its torch threads to 1); the bare
loop runs with 1 thread too, so the comparison is per core.
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
    batches = iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=MICRO, drop_last=True)
    )
    times = []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        ids = next(batches)["input_ids"].long()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    if ray.train.get_context().get_world_rank() == 0:
        # Ray Train V2 keeps only metrics reported with a checkpoint: a file on this machine.
        Path(config["out"]).write_text(
            json.dumps({"step_times": times, "threads": torch.get_num_threads()})
        )


def run_handwritten(prepared: Path, model: dict, world: int, zero: int, precision: str, steps: int):
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(tempfile.mkdtemp(prefix="bench-hand-out-")) / "steps.json"
    trainer = TorchTrainer(
        handwritten_per_worker,
        train_loop_config={
            "model": model,
            "ds": ds_config(world, zero, precision),
            "steps": steps,
            "out": str(out),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=world),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-hand-")),
        datasets={"train": ray.data.read_parquet(str(prepared / "train")).materialize()},
    )
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    reported = json.loads(out.read_text())
    times = reported["step_times"]
    return window_rate(times, world), wall - sum(times[WARMUP_STEPS:]), reported["threads"]


def run_raygen(spec: dict, world: int, zero: int, precision: str) -> tuple[float, float]:
    from raygen.jobs.launch import launch
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.train import metrics as m

    spec = json.loads(json.dumps(spec))
    spec["name"] = f"raygen-w{world}-z{zero}-{precision}"
    spec["scaling"] = {"num_workers": world}
    spec["deepspeed"] = {"zero_stage": zero}
    spec["train"]["precision"] = precision
    started = time.perf_counter()
    result = launch(validate_spec(TrainSpec, spec, "bench"), fresh=True)
    wall = time.perf_counter() - started
    rows = m.read_metrics(result["paths"]["metrics"])
    windows = [r[m.STEP_TIME_S] for r in rows if m.STEP_TIME_S in r and r[m.STEP] > WARMUP_STEPS]
    steady = statistics.median(windows)
    return MICRO * SEQ_LEN * world / steady, wall - steady * len(windows) * WINDOW


def bare_loop(args: dict[str, Any]) -> None:
    """One process, no Ray: plain deepspeed.initialize on a world of 1, shards read with
    pyarrow. Prints {"tokens_per_s", "startup_s"} as JSON."""
    started = time.perf_counter()
    import deepspeed
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
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
            {"tokens_per_s": window_rate(times, 1), "startup_s": wall - sum(times[WARMUP_STEPS:])}
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
    return result["tokens_per_s"], result["startup_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three configurations only")
    parser.add_argument("--steps", type=int, default=60)
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
    rows = []
    for world, zero, precision in QUICK if args.quick else FULL:
        ours, ours_start = run_raygen(spec, world, zero, precision)
        hand, hand_start, threads = run_handwritten(
            Path(spec["data"]["prepared"]), model, world, zero, precision, args.steps
        )
        row = {
            "workers": world,
            "zero": zero,
            "precision": precision,
            "raygen_tok_s": ours,
            "hand_ray_tok_s": hand,
            "vs_hand_ray": ours / hand,
            "raygen_startup_s": ours_start,
            "hand_ray_startup_s": hand_start,
            "threads_per_worker": threads,
        }
        if world == 1:
            bare, bare_start = run_bare(
                Path(spec["data"]["prepared"]), model, zero, precision, args.steps
            )
            row.update(bare_tok_s=bare, vs_bare=ours / bare, bare_startup_s=bare_start)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ray.shutdown()
    print()
    print_table(
        rows,
        [
            "workers",
            "zero",
            "precision",
            "raygen_tok_s",
            "hand_ray_tok_s",
            "vs_hand_ray",
            "bare_tok_s",
            "vs_bare",
            "raygen_startup_s",
            "hand_ray_startup_s",
            "bare_startup_s",
        ],
    )
    print(
        f"\nRay start: {ray_start:.1f} s; targets: vs_hand_ray >= 0.95, vs_bare >= 0.90 (1 worker)"
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
            "targets": {"vs_hand_ray": 0.95, "vs_bare_1_worker": 0.90},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
