"""Derive the DeepSpeed config from a train spec: the one place that config is written."""

from __future__ import annotations

import copy
from typing import Any

from raygen.jobs.spec import TrainSpec, global_batch_size

# DeepSpeed prints every `steps_per_print` steps; raygen logs its own metrics.
_QUIET_STEPS = 10**9
# DeepSpeed's default gradient bucket (elements), allocated whole on every rank whatever the
# model's size (ZeRO-3 always, ZeRO-1/2 with overlap_comm: twice): 1 GB in bf16.
DEEPSPEED_BUCKET = 500_000_000
# Below this, more buckets mean more, smaller all-reduces for no memory worth saving (8 MB bf16).
MIN_BUCKET = 2**22


def bucket_elements(largest_param: int) -> int:
    """Gradient bucket size: one whole largest tensor, within [MIN_BUCKET, DeepSpeed's]."""
    return int(min(DEEPSPEED_BUCKET, max(MIN_BUCKET, largest_param)))


def derive_deepspeed_config(
    spec: TrainSpec, world_size: int, largest_param: int | None = None
) -> dict[str, Any]:
    """Build the DeepSpeed config for `spec` on `world_size` workers.

    With `largest_param` (elements of the model's largest parameter tensor), gradient
    buckets are sized to the model instead of DeepSpeed's fixed 5e8 elements, which would
    otherwise be a per-rank buffer several times a small model's whole training state.
    `deepspeed.overrides` is deep-merged last. The optimizer and LR schedule are built
    by raygen (client objects), so they are not part of this config.
    """
    t, ds = spec.train, spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        # Overlap gradient reduction with the backward pass and bucket it.
        zero.update(overlap_comm=spec.scaling.use_gpu, contiguous_gradients=True)
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.scaling.use_gpu}
    if ds.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.scaling.use_gpu}
    if ds.zero_stage == 3:
        # Export gathers the full 16-bit weights from every rank's partition.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if largest_param and ds.zero_stage >= 1:
        bucket = bucket_elements(largest_param)
        zero["reduce_bucket_size"] = bucket
        if ds.zero_stage < 3:
            zero["allgather_bucket_size"] = bucket

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": global_batch_size(spec, world_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer == "cpu":
        # DeepSpeedCPUAdam is required with optimizer offload; raygen builds it.
        config["zero_force_ds_cpu_optimizer"] = True
    return deep_merge(config, ds.overrides)


def deepspeed_config_problems(spec: TrainSpec, world_size: int) -> list[str]:
    """Problems with the derived config that DeepSpeed would only report on the workers."""
    problems = []
    config = derive_deepspeed_config(spec, world_size)
    expected = global_batch_size(spec, world_size)
    for key, value in (
        ("train_batch_size", expected),
        ("train_micro_batch_size_per_gpu", spec.train.micro_batch_size),
        ("gradient_accumulation_steps", spec.train.grad_accum),
    ):
        if config.get(key) != value:
            problems.append(
                f"`deepspeed.overrides.{key}`: {config.get(key)!r} contradicts the spec "
                f"(train.micro_batch_size x train.grad_accum x scaling.num_workers = "
                f"{spec.train.micro_batch_size} x {spec.train.grad_accum} x {world_size} "
                f"= {expected}); set the batch through `train.*` and remove the override."
            )
    if "optimizer" in config or "scheduler" in config:
        problems.append(
            "`deepspeed.overrides`: `optimizer`/`scheduler` are built from `train.*` "
            "(lr, weight_decay, adam_betas, lr_schedule); remove them from the overrides."
        )
    return problems


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in recursively (override wins)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
