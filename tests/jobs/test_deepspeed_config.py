"""DeepSpeed config derivation: one function, global batch computed once, overrides merged."""

from __future__ import annotations

from raygen.jobs.loader import validate_spec
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.deepspeed_config import (
    DEEPSPEED_BUCKET,
    MIN_BUCKET,
    deep_merge,
    deepspeed_config_problems,
    derive_deepspeed_config,
)


def spec_with(**sections) -> TrainSpec:
    raw = {"name": "x", "model": {"arch": "gpt2"}, "data": {"train": "builtin:python-stdlib"}}
    raw.update(sections)
    return validate_spec(TrainSpec, raw, "s")


def test_batch_sizes_follow_micro_accum_and_world():
    spec = spec_with(train={"micro_batch_size": 4, "grad_accum": 3})
    config = derive_deepspeed_config(spec, world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * 8


def test_precision_and_clipping():
    config = derive_deepspeed_config(spec_with(train={"precision": "bf16", "grad_clip": 0.5}), 2)
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"]["enabled"] is False
    assert config["gradient_clipping"] == 0.5


def test_zero3_with_offload():
    spec = spec_with(
        deepspeed={"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}
    )
    zero = derive_deepspeed_config(spec, 2)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_gradient_buckets_are_sized_to_the_largest_tensor():
    for stage in (1, 2, 3):
        zero = derive_deepspeed_config(spec_with(deepspeed={"zero_stage": stage}), 2, 10**7)
        assert zero["zero_optimization"]["reduce_bucket_size"] == 10**7
        assert zero["zero_optimization"].get("allgather_bucket_size") == (
            10**7 if stage < 3 else None
        )
    spec = spec_with(deepspeed={"zero_stage": 2})
    assert derive_deepspeed_config(spec, 2, 10)["zero_optimization"]["reduce_bucket_size"] == (
        MIN_BUCKET
    )
    huge = derive_deepspeed_config(spec, 2, 10**10)["zero_optimization"]
    assert huge["reduce_bucket_size"] == DEEPSPEED_BUCKET
    # without a model (validation), or with no ZeRO, DeepSpeed's own defaults stand
    assert "reduce_bucket_size" not in derive_deepspeed_config(spec, 2)["zero_optimization"]
    zero0 = derive_deepspeed_config(spec_with(deepspeed={"zero_stage": 0}), 2, 10**7)
    assert "reduce_bucket_size" not in zero0["zero_optimization"]


def test_overrides_are_deep_merged_last():
    spec = spec_with(
        deepspeed={"zero_stage": 2, "overrides": {"zero_optimization": {"reduce_bucket_size": 7}}}
    )
    zero = derive_deepspeed_config(spec, 2, 10**7)["zero_optimization"]
    assert zero == {**zero, "stage": 2, "reduce_bucket_size": 7}


def test_overrides_that_contradict_the_batch_are_problems():
    spec = spec_with(deepspeed={"overrides": {"train_batch_size": 1000}})
    found = deepspeed_config_problems(spec, 2)
    assert len(found) == 1
    assert "`deepspeed.overrides.train_batch_size`: 1000 contradicts the spec" in found[0]
    assert "= 16" in found[0]


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": 2}}
    merged = deep_merge(base, {"a": {"b": 3}, "d": 4})
    assert merged == {"a": {"b": 3, "c": 2}, "d": 4}
    assert base == {"a": {"b": 1, "c": 2}}
