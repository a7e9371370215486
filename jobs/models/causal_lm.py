"""Build transformers causal language models from a spec (pure transformers)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from raygen.jobs.spec import ModelSpec


def build_config(
    model: ModelSpec, vocab_size: int, seq_len: int, eos_token_id: int
) -> PretrainedConfig:
    """The transformers config of the network, sized to the tokenizer and sequence length."""
    if model.pretrained:
        return AutoConfig.from_pretrained(model.pretrained)
    kwargs = {
        "vocab_size": vocab_size,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        **model.config,
    }
    config = AutoConfig.for_model(model.arch, **kwargs)
    # Make sure positions cover the training sequence length.
    for attr in ("n_positions", "max_position_embeddings"):
        if hasattr(config, attr) and attr not in model.config:
            setattr(config, attr, max(getattr(config, attr) or 0, seq_len))
    return config


def largest_parameter(config: PretrainedConfig) -> int:
    """Elements of the network's largest parameter tensor, counted without allocating it."""
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return max(p.numel() for p in net.parameters())


def build_causal_lm(model: ModelSpec, config: PretrainedConfig) -> PreTrainedModel:
    """Instantiate the network: random weights for `arch`, saved weights for `pretrained`."""
    kwargs: dict[str, Any] = {"attn_implementation": model.attn_implementation}
    if model.pretrained:
        net = AutoModelForCausalLM.from_pretrained(
            model.pretrained, use_safetensors=True, dtype=torch.float32, **kwargs
        )
    else:
        net = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    if model.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return net
