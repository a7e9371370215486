"""What an AutoencoderKL config means, read without importing diffusers (which loads torch):
its problems, and the shapes of the images and latents of a VAE built from it. The defaults
of diffusers' AutoencoderKL are kept in raygen's cache per diffusers version
(`library_facts`)."""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

from raygen.jobs.library_facts import diffusers_defaults
from raygen.jobs.unet_facts import block_problems


def vae_defaults() -> dict[str, Any]:
    """AutoencoderKL's keyword arguments and their defaults."""
    return diffusers_defaults("AutoencoderKL")


def vae_problems(config: dict[str, Any], pretrained: bool) -> list[str]:
    """Problems with an AutoencoderKL config (key paths and fixes) found without building it;
    a pretrained VAE's keys are its own."""
    problems = []
    defaults = vae_defaults()
    for key in config:
        if key not in defaults and not pretrained:
            close = get_close_matches(key, sorted(defaults), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"`model.config.{key}`: not a parameter of AutoencoderKL{hint}")
    merged = {**defaults, **config}
    problems += block_problems(merged, "the encoder's downsampling over its", "blocks")
    if merged["out_channels"] != merged["in_channels"]:
        problems.append(
            f"`model.config.out_channels`: {merged['out_channels']} differs from in_channels "
            f"{merged['in_channels']}; a VAE reconstructs the image it is given."
        )
    return problems


def image_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the images a VAE with this config encodes."""
    merged = {**vae_defaults(), **config}
    return merged["in_channels"], merged["sample_size"], merged["sample_size"]


def latent_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of its latents: the encoder halves the size in every block
    but the last."""
    merged = {**vae_defaults(), **config}
    size = merged["sample_size"] // 2 ** (len(merged["down_block_types"]) - 1)
    return merged["latent_channels"], size, size
