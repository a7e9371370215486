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
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",)  # a diffusers model's weights
# The network each image family trains, as a diffusers pipeline directory names its folder.
IMAGE_COMPONENTS = {"diffusion": "unet", "vae": "vae"}
_CLASS_NAMES = {"diffusion": "UNet", "vae": "AutoencoderKL (VAE)"}
DIT_CLASSES = ("DiTPipeline", "DiTTransformer2DModel")


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
    """What is wrong with `model.vae` (none without one): a whole diffusers AutoencoderKL
    directory with safetensors weights, square images, and latents DiTPipeline decodes as
    saved (no shift)."""
    if model.vae is None:
        return []
    from raygen.cluster.errors import StorageError
    from raygen.cluster.publish import require_complete

    path = latent_vae_dir(model)
    try:
        require_complete(path, "`model.vae`:", "train or export the VAE again.")
        text = read_text(join(path, "config.json"))
        config = json.loads(text) if text is not None else None
    except StorageError as exc:
        return [str(exc)]
    except ValueError:
        return [f"`model.vae`: {path}/config.json is not valid JSON; save the VAE again."]
    if text is None:
        return [
            f"`model.vae`: {model.vae} is not a VAE directory (no config.json or "
            "vae/config.json); give the model/ directory of a raygen VAE run, or any diffusers "
            "AutoencoderKL saved with save_pretrained."
        ]
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "AutoencoderKL":
        return [f"`model.vae`: {path} holds a {name}, not an AutoencoderKL; give a VAE directory."]
    if not any(exists(join(path, f)) for f in DIFFUSERS_WEIGHTS):
        return [f"`model.vae`: {path} has no {DIFFUSERS_WEIGHTS[0]} (safetensors weights)."]
    if not isinstance(config.get("sample_size", 0), int):
        return [
            f"`model.vae`: {path} has sample_size {config['sample_size']}; raygen trains on "
            "square images: give a VAE whose sample_size is one integer."
        ]
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
        if _is_dit(model.pretrained):
            return [
                f"`model.pretrained`: {model.pretrained} is a DiT; fine-tuning a saved DiT is "
                "not supported: train one with `arch: dit` and `model.vae` (its VAE: "
                f"{component_dir(model.pretrained, 'vae')})."
            ]
        if not exists(join(path, "config.json")):
            folder = IMAGE_COMPONENTS[model.family]
            return [
                f"`model.pretrained`: {model.pretrained} is not a diffusers "
                f"{_CLASS_NAMES[model.family]} or pipeline directory (no config.json or "
                f"{folder}/config.json); save one with save_pretrained."
            ]
        if not any(exists(join(path, f)) for f in DIFFUSERS_WEIGHTS):
            return [
                f"`model.pretrained`: {path} has no {DIFFUSERS_WEIGHTS[0]} (safetensors weights)."
            ]
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


def _is_dit(pretrained: str) -> bool:
    """Whether a pretrained directory is a DiT pipeline or a DiT transformer's directory."""
    for name in (PIPELINE_INDEX, "config.json"):
        try:
            saved = json.loads(read_text(join(pretrained, name)) or "{}")
        except ValueError:
            continue
        if isinstance(saved, dict) and saved.get("_class_name") in DIT_CLASSES:
            return True
    return False


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
