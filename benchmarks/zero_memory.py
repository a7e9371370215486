"""ZeRO memory: per-rank bytes of parameters, gradients and optimizer state of raygen's
DeepSpeed engine for ZeRO-0/1/2/3 and with CPU offload, on 2 workers in bf16, against the
ZeRO paper's formulas (Rajbhandari et al. 2020, mixed precision, K = 12):

    stage 0: (2 + 2 + K) Psi    stage 1: 4 Psi + K Psi/N
    stage 2: 2 Psi + (2 + K) Psi/N    stage 3: (4 + K) Psi/N

and, with the optimizer offloaded, ZeRO-Offload's (Ren et al. 2021), which adds an fp32
gradient partition on the CPU (4 Psi/N): bytes move to the CPU, they do not vanish. With
LoRA only the adapters' Phi parameters train: the frozen weights keep their 2 Psi (2 Psi/N
under ZeRO-3), gradients and optimizer state shrink to those of Phi (sharded as above).

    python benchmarks/zero_memory.py          # ~5 min on 2 cores

The engine is built by raygen's own `build_engine` from a spec (the same model, DeepSpeed
config and optimizer `raygen train` uses), in a 2-worker Ray Train job. Each rank trains two
steps, then runs one more forward and backward and, with the gradients alive and before the
optimizer step, counts every live tensor once (by storage) into:

    params     the module's 16-bit weights (under ZeRO-3, this rank's partitions)
    optimizer  the optimizer's fp32 master weights and Adam moments
    grads      everything else: gradients, gradient buckets and reduction buffers

and records the process's peak RSS (which also holds PyTorch, activations and the batch).
Target: within 10% of the formula for each stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402

# A 12-layer GPT-2 of width 512 and an 8k vocabulary: Psi ~ 42M, 16 Psi ~ 0.67 GB per rank.
MODEL = {"n_layer": 12, "n_embd": 512, "n_head": 8}
VOCAB, SEQ_LEN, MICRO, WORLD = 8192, 128, 2, 2
K = 12
# DeepSpeed's own gradient bucket size, which raygen replaces by one sized to the model.
DEFAULT_BUCKET = {"zero_optimization": {"reduce_bucket_size": 500_000_000}}
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
CONFIGS = [
    ("ZeRO-0", 0, "none", "none", {}, None),
    ("ZeRO-1", 1, "none", "none", {}, None),
    ("ZeRO-2", 2, "none", "none", {}, None),
    ("ZeRO-3", 3, "none", "none", {}, None),
    ("ZeRO-3, DeepSpeed's default bucket", 3, "none", "none", DEFAULT_BUCKET, None),
    ("ZeRO-2 + optimizer offload", 2, "cpu", "none", {}, None),
    ("ZeRO-3 + optimizer/param offload", 3, "cpu", "cpu", {}, None),
    ("ZeRO-2 + LoRA r=16", 2, "none", "none", {}, LORA),
    ("ZeRO-3 + LoRA r=16", 3, "none", "none", {}, LORA),
]
MIB = 2**20


def spec(
    zero: int, offload_optimizer: str, offload_params: str, overrides: dict, lora: dict | None
) -> dict[str, Any]:
    return {
        "name": f"zero-memory-{zero}",
        "model": {"arch": "gpt2", "config": MODEL, "lora": lora},
        "data": {"train": "builtin:python-stdlib", "seq_len": SEQ_LEN},
        "train": {"micro_batch_size": MICRO, "precision": "bf16"},
        "deepspeed": {
            "zero_stage": zero,
            "offload_optimizer": offload_optimizer,
            "offload_params": offload_params,
            "overrides": overrides,
        },
        "scaling": {"num_workers": WORLD},
    }


def formula(zero: int, offload: bool, psi: int, n: int, phi: int | None = None) -> dict[str, float]:
    """Bytes per rank by the papers: 16-bit params, 16-bit grads, K bytes of optimizer state
    (and with offload an fp32 gradient partition on the CPU). `phi`: the parameters that
    train, when not all (LoRA)."""
    phi = psi if phi is None else phi
    params = 2 * psi / n if zero == 3 else 2 * psi
    grads = 2 * phi / n if zero >= 2 else 2 * phi
    if offload:
        grads += 4 * phi / n
    optimizer = K * phi / n if zero >= 1 else K * phi
    return {"params": params, "grads": grads, "optimizer": optimizer}


def live_tensor_bytes(engine: Any) -> dict[str, int]:
    """Every live tensor storage once, classified as params / optimizer / grads (the rest)."""
    import torch

    def key(t: torch.Tensor) -> tuple[int, int]:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()

    seen: dict[int, str] = {}
    sizes: dict[int, int] = {}

    def claim(t: Any, category: str) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr, nbytes = key(t)
            if ptr and ptr not in seen:
                seen[ptr], sizes[ptr] = category, nbytes

    for p in engine.module.parameters():
        claim(getattr(p, "ds_tensor", p), "params")
    # fp32 master weights: ZeRO-1/2, ZeRO-3 (lent to the inner optimizer only during a step)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(engine.optimizer, name, None) or []:
            claim(t, "optimizer")
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        for p in group["params"]:
            claim(p, "optimizer")
    for state in inner.state.values():
        for value in state.values():
            claim(value, "optimizer")
    gc.collect()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                claim(obj, "grads")
        except ReferenceError:  # a dead weak proxy
            continue
    totals = {"params": 0, "optimizer": 0, "grads": 0}
    for ptr, category in seen.items():
        totals[category] += sizes[ptr]
    return totals


def per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch

    from raygen.jobs.models.lora import trainable_parameters
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.train.lm import build_engine

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    spec = TrainSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    engine, _, _zero3 = build_engine(spec, VOCAB, 0, world)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ_LEN), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    measured = live_tensor_bytes(engine)
    engine.step()
    phi, psi = trainable_parameters(engine.module)
    measured.update(
        rank=rank,
        psi=psi,
        phi=phi,
        rss_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rss_start=rss_start,
        reduce_bucket_size=engine.zero_reduce_bucket_size(),
    )
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(measured, default=str))


def measure(raw: dict[str, Any]) -> list[dict[str, Any]]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tempfile.mkdtemp(prefix="bench-zero-out-")
    TorchTrainer(
        per_worker,
        train_loop_config={"spec": raw, "out": out},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-zero-")),
    ).fit()
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="configuration names to run (default: all)")
    args = parser.parse_args()

    import ray

    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec

    ray.init(log_to_driver=False)
    rows = []
    for name, zero, opt, par, overrides, lora in CONFIGS:
        if args.only and name not in args.only:
            continue
        raw = spec(zero, opt, par, overrides, lora)
        ranks = measure(validate_spec(TrainSpec, raw, "bench").model_dump(mode="json"))
        r0 = ranks[0]
        expected = formula(zero, opt == "cpu", r0["psi"], WORLD, r0["phi"])
        measured_total = r0["params"] + r0["grads"] + r0["optimizer"]
        expected_total = sum(expected.values())
        row = {
            "config": name,
            "psi_m": r0["psi"] / 1e6,
            "trainable_m": r0["phi"] / 1e6,
            **{f"{c}_mib": r0[c] / MIB for c in ("params", "grads", "optimizer")},
            "total_mib": measured_total / MIB,
            "formula_mib": expected_total / MIB,
            "vs_formula": measured_total / expected_total,
            **{f"formula_{c}_mib": v / MIB for c, v in expected.items()},
            "rss_peak_mib": r0["rss_peak"] / MIB,
            "rss_growth_mib": (r0["rss_peak"] - r0["rss_start"]) / MIB,
            "ranks_agree": all(
                abs(r["params"] + r["grads"] + r["optimizer"] - measured_total)
                <= 0.01 * measured_total
                for r in ranks
            ),
            "reduce_bucket_size": r0["reduce_bucket_size"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    ray.shutdown()
    print()
    print_table(
        rows,
        [
            "config",
            "params_mib",
            "formula_params_mib",
            "grads_mib",
            "formula_grads_mib",
            "optimizer_mib",
            "formula_optimizer_mib",
            "total_mib",
            "formula_mib",
            "vs_formula",
            "rss_peak_mib",
        ],
    )
    path = write_results(
        "zero_memory",
        rows,
        {
            "model": {**MODEL, "vocab_size": VOCAB},
            "workers": WORLD,
            "precision": "bf16",
            "K": K,
            "counted": "live tensors by storage, after backward and before the optimizer step",
            "target": "within 10% of the formula for each stage",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
