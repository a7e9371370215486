"""A spec's pretrained model directory, local or on an object store, read without torch:
its files checked in one place (one message each), and an image model's config (a
diffusion UNet's, a VAE's) read once per process however many steps ask for it."""

from __future__ import annotations

import functools
import json
from typing import Any

from raygen.cluster.storage import exists, join, read_text
from raygen.jobs.spec import ModelSpec

LM_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline directory: its UNet is in unet/
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors",)  # a diffusers model's weights
# The network each image family trains, as a diffusers pipeline directory names its folder.
IMAGE_COMPONENTS = {"diffusion": "unet", "vae": "vae"}
_CLASS_NAMES = {"diffusion": "UNet", "vae": "AutoencoderKL (VAE)"}


def component_dir(pretrained: str, family: str) -> str:
    """The family's network inside a pretrained directory or URI: its folder of a pipeline
    (`unet/`, `vae/`), else the directory itself."""
    if exists(join(pretrained, PIPELINE_INDEX)):
        return join(pretrained, IMAGE_COMPONENTS[family])
    return pretrained


def unet_dir(pretrained: str) -> str:
    """The UNet inside a pretrained directory or URI: `unet/` of a pipeline, else itself."""
    return component_dir(pretrained, "diffusion")


def latent_vae_dir(model: ModelSpec) -> str:
    """The AutoencoderKL of a latent diffusion spec's `model.vae` (its vae/ in a pipeline)."""
    assert model.vae is not None
    return component_dir(model.vae, "vae")


def latent_vae_problems(model: ModelSpec) -> list[str]:
    """What is wrong with `model.vae` (none without one): a diffusers AutoencoderKL
    directory with safetensors weights whose latents DiTPipeline decodes as saved."""
    if model.vae is None:
        return []
    path = latent_vae_dir(model)
    text = read_text(join(path, "config.json"))
    if text is None:
        return [
            f"`model.vae`: {model.vae} is not a VAE directory (no config.json or "
            "vae/config.json); give the model/ directory of a raygen VAE run, or any diffusers "
            "AutoencoderKL saved with save_pretrained."
        ]
    config = json.loads(text)
    if config.get("_class_name") != "AutoencoderKL":
        return [
            f"`model.vae`: {path} holds a {config.get('_class_name')}, not an AutoencoderKL; "
            "give a VAE directory."
        ]
    if not any(exists(join(path, f)) for f in UNET_WEIGHTS):
        return [f"`model.vae`: {path} has no {UNET_WEIGHTS[0]} (safetensors weights)."]
    if config.get("shift_factor") is not None:
        return [
            f"`model.vae`: {path} shifts its latents (shift_factor {config['shift_factor']}), "
            "which DiTPipeline does not undo when decoding; give a VAE without a shift_factor."
        ]
    return []


def latent_vae_config(model: ModelSpec) -> dict[str, Any]:
    """The AutoencoderKL keyword arguments of `model.vae`."""
    assert model.vae is not None
    return dict(_saved_config(model.vae, "vae"))


def latent_shape_of(model: ModelSpec) -> tuple[int, int, int]:
    """(channels, height, width) of the latents a latent diffusion spec trains on."""
    from raygen.jobs.vae_facts import latent_shape

    return latent_shape(latent_vae_config(model))


def pretrained_problems(model: ModelSpec) -> list[str]:
    """What is missing from `model.pretrained` (none without one): a config and weights
    saved with save_pretrained, in safetensors."""
    if not model.pretrained or model.family == "gan":  # a GAN's is refused by its own checks
        return []
    if model.family in IMAGE_COMPONENTS:
        path = component_dir(model.pretrained, model.family)
        if not exists(join(path, "config.json")):
            folder = IMAGE_COMPONENTS[model.family]
            return [
                f"`model.pretrained`: {model.pretrained} is not a diffusers "
                f"{_CLASS_NAMES[model.family]} or pipeline directory (no config.json or "
                f"{folder}/config.json); save one with save_pretrained."
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
    return image_model_config(model)


def image_model_config(model: ModelSpec) -> dict[str, Any]:
    """The keyword arguments of the network an image spec trains (UNet2DModel,
    AutoencoderKL): `model.config`, or the pretrained network's saved config."""
    if model.pretrained:
        return dict(_saved_config(model.pretrained, model.family))
    return dict(model.config)


def image_shape_of(model: ModelSpec) -> tuple[int, int, int]:
    """(channels, height, width) of the images an image spec's network takes (a latent
    diffusion spec's VAE's): what the data is prepared to."""
    from raygen.jobs import gan_facts, unet_facts, vae_facts

    if model.vae is not None:
        return vae_facts.image_shape(latent_vae_config(model))
    facts = {"vae": vae_facts, "gan": gan_facts}.get(model.family, unet_facts)
    return facts.image_shape(image_model_config(model))


def classes_of(model: ModelSpec) -> int:
    """Classes an image spec's network is conditioned on (0: unconditional; a VAE is; a
    DiT's label table has 1000, whatever the data's number of classes)."""
    from raygen.jobs import dit_facts, gan_facts, unet_facts

    if model.vae is not None:
        return dit_facts.NULL_CLASS
    if model.family == "gan":
        return gan_facts.num_classes(image_model_config(model))
    return unet_facts.num_classes(image_model_config(model)) if model.family == "diffusion" else 0


@functools.lru_cache(maxsize=16)
def _saved_config(pretrained: str, family: str) -> dict[str, Any]:
    text = read_text(join(component_dir(pretrained, family), "config.json"))
    config = json.loads(text) if text else {}
    return {k: v for k, v in config.items() if not k.startswith("_")}
