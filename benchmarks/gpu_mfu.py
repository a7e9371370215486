"""GPU throughput: tokens/s and model FLOPs utilization of `raygen train` on a ~1.1B-parameter
Llama-style model (TinyLlama's shape) on one GPU, ZeRO-2 and ZeRO-3, bf16, with and without
activation checkpointing.

    python benchmarks/gpu_mfu.py            # on a CUDA machine (~10 min)
    python benchmarks/gpu_mfu.py --tiny     # a small model on CPU: checks the script only

MFU = tokens/s x (6N + 12 L d T) / the GPU's dense bf16 peak (N parameters, L layers, d
width, T sequence length; recomputation under checkpointing is not counted as useful work).
Steady state: the median of 5-step windows after 10 warm-up steps. Target: MFU >= 40% on
an H100 (the best published dense bf16 results are about 40-47%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity), by the device name torch reports.
PEAK_BF16 = {
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}
TINY = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
WINDOW, WARMUP = 5, 10


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16.items():
        if key in name:
            return flops
    return None


def spec(
    storage: Path, config: dict, seq: int, micro: int, steps: int, zero: int, ckpt: bool, gpu: bool
) -> dict[str, Any]:
    return {
        "name": f"mfu-z{zero}-{'ckpt' if ckpt else 'full'}",
        "model": {"arch": "llama", "config": config, "gradient_checkpointing": ckpt},
        "data": {
            "train": "builtin:python-stdlib",
            "seq_len": seq,
            "max_bytes": 20_000_000,
            "eval_fraction": 0.01,
            "prepared": str(storage / "prepared"),
        },
        "tokenizer": {"train": {"vocab_size": 32000}},
        "train": {
            "max_steps": steps,
            "micro_batch_size": micro,
            "precision": "bf16",
            "lr": 3e-4,
            "lr_schedule": "constant",
            "log_every": WINDOW,
            "eval_every": steps,
            "eval_batches": 1,
            "checkpoint_every": steps,
        },
        "deepspeed": {"zero_stage": zero},
        "scaling": {"num_workers": 1, "use_gpu": gpu},
        "run": {"storage": str(storage / "runs"), "keep_checkpoints": 1},
    }


def parameters(config: dict, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **config))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke run)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    import ray
    import torch

    from jobs import metrics as m
    from jobs.launch import launch
    from jobs.loader import validate_spec
    from jobs.spec import TrainSpec

    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        sys.exit("no CUDA GPU here: run on a GPU machine, or --tiny to check the script on CPU")
    config, seq, micro = (TINY, 128, 4) if args.tiny else (LLAMA_1B, 2048, 4)
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = peak_flops(device) if gpu else None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    storage = Path(tempfile.mkdtemp(prefix="bench-mfu-"))
    ray.init(log_to_driver=False)
    rows = []
    for zero in (2, 3):
        for ckpt in (False, True):
            raw = spec(storage, config, seq, micro, args.steps, zero, ckpt, gpu)
            started = time.perf_counter()
            result = launch(validate_spec(TrainSpec, raw, "bench"), fresh=True)
            wall = time.perf_counter() - started
            metric_rows = m.read_metrics(result["paths"]["metrics"])
            windows = [
                r[m.STEP_TIME_S] for r in metric_rows if m.STEP_TIME_S in r and r[m.STEP] > WARMUP
            ]
            tokens_per_s = micro * seq / statistics.median(windows)
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(result["paths"]["model"]))
            n = parameters(config, vocab)
            flops_per_token = 6 * n + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq
            row = {
                "zero": zero,
                "checkpointing": ckpt,
                "params_m": n / 1e6,
                "tokens_per_s": tokens_per_s,
                "tflops": tokens_per_s * flops_per_token / 1e12,
                "mfu": tokens_per_s * flops_per_token / peak if peak else None,
                "wall_s": wall,
            }
            rows.append(row)
            print(row, flush=True)
    ray.shutdown()
    print_table(
        rows, ["zero", "checkpointing", "params_m", "tokens_per_s", "tflops", "mfu", "wall_s"]
    )
    path = write_results(
        "gpu_mfu" if gpu else "gpu_mfu_tiny_cpu",
        rows,
        {
            "device": device,
            "peak_bf16_flops": peak,
            "seq_len": seq,
            "micro_batch": micro,
            "target_mfu_h100": 0.40,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
