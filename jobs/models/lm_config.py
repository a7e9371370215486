"""A causal LM's `model.arch` and `model.config` checked against transformers' own config
classes, without building the network (imports transformers' configuration code only,
not its modeling code)."""

from __future__ import annotations

import inspect
from typing import Any

from raygen.jobs.spec import ModelSpec


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


def _consumed_by(config_cls: type, key: str, value: Any) -> bool:
    """True when the config class accepts `key` as a legacy alias (e.g. Llama's rope_theta).

    transformers keeps unknown keyword arguments as plain attributes; a key it converts into
    another field disappears from `to_dict()`.
    """
    try:
        return key not in config_cls(**{key: value}).to_dict()
    except Exception:  # a bad value for a real parameter: it is a known key
        return True


def _config_keys(config_cls: type) -> set[str]:
    from transformers import PretrainedConfig

    keys: set[str] = set(getattr(config_cls, "attribute_map", {}))
    for cls in config_cls.__mro__:
        if issubclass(cls, PretrainedConfig):
            keys |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
            keys |= set(getattr(cls, "__annotations__", {}))
    return keys


def config_keys(arch: str) -> set[str]:
    """Every keyword the config class of `arch` takes (its own and its bases')."""
    from transformers import CONFIG_MAPPING

    return _config_keys(CONFIG_MAPPING[arch])
