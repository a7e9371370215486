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


def build_trainable_lm(
    model: ModelSpec, config: PretrainedConfig, vocab_size: int, train_new_rows: bool = True
) -> PreTrainedModel:
    """The network as a run trains it: `build_causal_lm`, its embeddings grown to
    `vocab_size` for a chat template's tokens, and LoRA adapters when `model.lora` is set
    (the new token rows train with them if `train_new_rows`).

    Seeded the same way, it rebuilds the same frozen weights: a LoRA checkpoint holds only
    what trains.
    """
    from raygen.jobs.models.lora import add_lora

    net = build_causal_lm(model, config)
    rows = net.get_input_embeddings().num_embeddings
    new_token_ids = list(range(rows, vocab_size))
    if new_token_ids:
        # New rows are drawn from the other rows' mean and covariance (transformers' mean
        # resizing).
        net.resize_token_embeddings(vocab_size, mean_resizing=True)
    if model.lora:
        net = add_lora(net, model.lora, new_token_ids if train_new_rows else [])
    return net
