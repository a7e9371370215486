"""GPU throughput: tokens/s and model FLOPs utilization of `raygen train` on a ~1.1B-parameter
Llama-style model (TinyLlama's shape) on one GPU, ZeRO-2 and ZeRO-3, bf16, with and without
activation checkpointing.

    python benchmarks/gpu_mfu.py            # on a CUDA machine (~6 min on an H100/H200)
    python benchmarks/gpu_mfu.py --tiny     # a small model on CPU: checks the script only

Each configuration is a real `raygen train` run (Ray Train, one GPU worker, DeepSpeed), the
same code path users run; steady state is the median of the 5-step windows raygen logs
after 10 warm-up steps (checkpoint and evaluation time are not step time).

MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak, with FLOPs per token =
6 N + 12 L d T (PaLM's convention: N the parameters taking part in matrix products, so the
input embedding, a lookup, is left out; L layers, d width, T sequence length; causal
attention counted in full). Recomputation under activation checkpointing is not useful
work and is not counted. Target: MFU >= 40% on an H100 (the best published dense bf16
results are about 40-47%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity), by the device name torch reports.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
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
COLUMNS = ["zero", "checkpointing", "params_m", "tokens_per_s", "tflops", "mfu", "peak_gpu_gib"]


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
            "max_bytes": 8_000_000,
            "eval_fraction": 0.02,
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


def flops_per_token(config: dict, vocab: int, seq: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of the Llama model `config`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **config))
    n = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    matmul = n - embedding  # untied: the output head is a matrix product, the embedding not
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    return n, 6 * matmul + 12 * layers * d * seq


class GpuMemoryPeak:
    """The most GPU memory in use (nvidia-smi, every 0.5 s) while the block runs: the
    worker is another process, so torch's own counters are out of reach here."""

    def __enter__(self) -> GpuMemoryPeak:
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            try:
                used = int(subprocess.run(query, capture_output=True, text=True).stdout.split()[0])
            except (OSError, ValueError, IndexError):
                return
            self.peak_mib = max(self.peak_mib, used)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke run)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro", type=int, default=8, help="sequences per step")
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    args = parser.parse_args()

    import ray
    import torch
    from transformers import AutoTokenizer

    from raygen.jobs.launch import launch
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.train import metrics as m

    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        sys.exit("no CUDA GPU here: run on a GPU machine, or --tiny to check the script on CPU")
    config, seq, micro = (TINY, 128, 4) if args.tiny else (LLAMA_1B, 2048, args.micro)
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = peak_flops(device) if gpu else None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    storage = Path(tempfile.mkdtemp(prefix="bench-mfu-"))
    notes = {
        "device": device,
        "peak_bf16_flops": peak,
        "model": config,
        "seq_len": seq,
        "micro_batch": micro,
        "steps": args.steps,
        "steady_state": f"median {WINDOW}-step window after step {WARMUP}",
        "target_mfu_h100": 0.40,
    }
    ray.init(log_to_driver=gpu)
    rows: list[dict[str, Any]] = []
    for ckpt in (False, True):
        for zero in args.zero:
            raw = spec(storage, config, seq, micro, args.steps, zero, ckpt, gpu)
            started = time.perf_counter()
            with GpuMemoryPeak() as memory:
                result = launch(validate_spec(TrainSpec, raw, "bench"), fresh=True, verbose=gpu)
            wall = time.perf_counter() - started
            windows = [
                r[m.STEP_TIME_S]
                for r in m.read_metrics(result["paths"]["metrics"])
                if m.STEP_TIME_S in r and r[m.STEP] > WARMUP
            ]
            tokens_per_s = micro * seq / statistics.median(windows)
            vocab = len(AutoTokenizer.from_pretrained(result["paths"]["model"]))
            n, per_token = flops_per_token(config, vocab, seq)
            rows.append(
                {
                    "zero": zero,
                    "checkpointing": ckpt,
                    "params_m": n / 1e6,
                    "tokens_per_s": tokens_per_s,
                    "tflops": tokens_per_s * per_token / 1e12,
                    "mfu": tokens_per_s * per_token / peak if peak else None,
                    "peak_gpu_gib": memory.peak_mib / 1024 if gpu else None,
                    "step_time_s": statistics.median(windows),
                    "windows": len(windows),
                    "run_wall_s": wall,
                }
            )
            print(rows[-1], flush=True)
            # A 1B model's checkpoint is ~15 GB: keep the disk for the next configuration.
            shutil.rmtree(storage / "runs", ignore_errors=True)
            path = write_results("gpu_mfu" if gpu else "gpu_mfu_tiny_cpu", rows, notes)
    ray.shutdown()
    shutil.rmtree(storage, ignore_errors=True)
    print_table(rows, COLUMNS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
