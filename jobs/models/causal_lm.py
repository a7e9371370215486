"""Build transformers causal language models from a spec (pure transformers)."""

from __future__ import annotations

import inspect
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


def config_class_problems(model: ModelSpec) -> list[str]:
    """Problems with `model.arch` and `model.config` found without building the network."""
    from difflib import get_close_matches

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model.pretrained:  # its files: jobs.pretrained.pretrained_problems
        return []
    arch = model.arch
    if arch not in CONFIG_MAPPING:
        close = get_close_matches(arch, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return [f"`model.arch`: transformers has no architecture {arch!r}.{hint}"]
    if arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [
            f"`model.arch`: {arch!r} has no causal-LM head in transformers; use e.g. gpt2, "
            "llama, mistral, qwen2."
        ]
    config_cls = CONFIG_MAPPING[arch]
    known = _config_keys(config_cls)
    problems = []
    for key, value in model.config.items():
        if key not in known and not _consumed_by(config_cls, key, value):
            close = get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"`model.config.{key}`: not a parameter of {config_cls.__name__}{hint}")
    return problems


def _consumed_by(config_cls: type[PretrainedConfig], key: str, value: Any) -> bool:
    """True when the config class accepts `key` as a legacy alias (e.g. Llama's rope_theta).

    transformers keeps unknown keyword arguments as plain attributes; a key it converts into
    another field disappears from `to_dict()`.
    """
    try:
        return key not in config_cls(**{key: value}).to_dict()
    except Exception:  # a bad value for a real parameter: it is a known key
        return True


def _config_keys(config_cls: type[PretrainedConfig]) -> set[str]:
    keys: set[str] = set(getattr(config_cls, "attribute_map", {}))
    for cls in config_cls.__mro__:
        if issubclass(cls, PretrainedConfig):
            keys |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
            keys |= set(getattr(cls, "__annotations__", {}))
    return keys
