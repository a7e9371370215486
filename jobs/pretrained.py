"""A spec's pretrained model directory, local or on an object store, read without torch:
its files checked in one place (one message each), and a diffusion UNet's config read
once per process however many steps ask for it."""

from __future__ import annotations

import functools
import json
from typing import Any

from raygen.cluster.storage import exists, join, read_text
from raygen.jobs.spec import ModelSpec

LM_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline directory: its UNet is in unet/
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors",)


def unet_dir(pretrained: str) -> str:
    """The UNet inside a pretrained directory or URI: `unet/` of a pipeline, else itself."""
    return join(pretrained, "unet") if exists(join(pretrained, PIPELINE_INDEX)) else pretrained


def pretrained_problems(model: ModelSpec) -> list[str]:
    """What is missing from `model.pretrained` (none without one): a config and weights
    saved with save_pretrained, in safetensors."""
    if not model.pretrained:
        return []
    if model.family == "diffusion":
        path = unet_dir(model.pretrained)
        if not exists(join(path, "config.json")):
            return [
                f"`model.pretrained`: {model.pretrained} is not a diffusers UNet or pipeline "
                "directory (no config.json or unet/config.json); save one with save_pretrained."
            ]
        if not any(exists(join(path, f)) for f in UNET_WEIGHTS):
            return [f"`model.pretrained`: {path} has no {UNET_WEIGHTS[0]} (safetensors weights)."]
        return []
    if not exists(join(model.pretrained, "config.json")):
        return [
            f"`model.pretrained`: {model.pretrained} has no config.json; give a directory "
            "saved with save_pretrained."
        ]
    if not any(exists(join(model.pretrained, f)) for f in LM_WEIGHTS):
        return [
            f"`model.pretrained`: {model.pretrained} has no safetensors weights "
            f"({' or '.join(LM_WEIGHTS)}); save the model with safe_serialization."
        ]
    return []


def unet_config(model: ModelSpec) -> dict[str, Any]:
    """The UNet2DModel keyword arguments a diffusion spec describes: `model.config`, or the
    pretrained UNet's saved config."""
    if model.pretrained:
        return dict(_saved_unet_config(model.pretrained))
    return dict(model.config)


@functools.lru_cache(maxsize=16)
def _saved_unet_config(pretrained: str) -> dict[str, Any]:
    text = read_text(join(unet_dir(pretrained), "config.json"))
    config = json.loads(text) if text else {}
    return {k: v for k, v in config.items() if not k.startswith("_")}
