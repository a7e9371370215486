"""What a UNet config means, read without importing diffusers (which loads torch): its
problems, the image shape and the classes of a UNet built from it. The defaults of diffusers'
UNet2DModel are kept in raygen's cache per diffusers version (`library_facts`)."""

from __future__ import annotations

from typing import Any

from raygen.jobs.library_facts import diffusers_defaults


def unet_defaults() -> dict[str, Any]:
    """UNet2DModel's keyword arguments and their defaults."""
    return diffusers_defaults("UNet2DModel")


def unet_problems(config: dict[str, Any], pretrained: bool, has_labels: bool) -> list[str]:
    """Problems with a UNet's config (`jobs.pretrained.unet_config`) found without
    building it (key paths and fixes); a pretrained UNet's keys are its own."""
    problems = []
    defaults = unet_defaults()
    known = set(defaults)
    for key in config:
        if key not in known and not pretrained:
            from difflib import get_close_matches

            close = get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"`model.config.{key}`: not a parameter of UNet2DModel{hint}")
    merged = {**defaults, **config}
    problems += block_problems(merged, "the UNet's downsampling over its", "down blocks")
    if has_labels and not merged.get("num_class_embeds"):
        problems.append(
            "`model.config.num_class_embeds`: the data has class labels for conditional "
            "training, but the UNet has no class embedding; set num_class_embeds to the number "
            "of classes (or drop data.label_column to train unconditionally)."
        )
    if merged.get("out_channels") != merged.get("in_channels"):
        problems.append(
            f"`model.config.out_channels`: {merged.get('out_channels')} differs from "
            f"in_channels {merged.get('in_channels')}; a diffusion UNet predicts noise of the "
            "image's shape."
        )
    return problems


def block_problems(merged: dict[str, Any], shrinks: str, blocks: str) -> list[str]:
    """The sizes a diffusers UNet2DModel's or AutoencoderKL's config (its keys merged with
    the defaults) must agree on: the image size through the downsampling, one channel
    count per block, norm groups dividing the channels."""
    problems = []
    size, channels = merged["sample_size"], merged["block_out_channels"]
    downs = len(merged["down_block_types"])
    if not isinstance(size, int):
        problems.append("`model.config.sample_size`: give one integer (square images).")
    elif size % 2 ** (downs - 1):
        problems.append(
            f"`model.config.sample_size`: {size} is not divisible by 2^{downs - 1} = "
            f"{2 ** (downs - 1)}, {shrinks} {downs} {blocks}; use a multiple of "
            f"{2 ** (downs - 1)} or fewer blocks."
        )
    if len(channels) != downs or len(merged["up_block_types"]) != downs:
        problems.append(
            f"`model.config.block_out_channels`: {len(channels)} entries, but there are {downs} "
            f"down_block_types and {len(merged['up_block_types'])} up_block_types; give one "
            "channel count per block."
        )
    groups = merged["norm_num_groups"]
    if groups and any(c % groups for c in channels):
        problems.append(
            f"`model.config.norm_num_groups`: {groups} does not divide every entry of "
            f"block_out_channels {list(channels)}; pick a common divisor."
        )
    return problems


def image_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the images a UNet with this config takes."""
    merged = {**unet_defaults(), **config}
    return merged["in_channels"], merged["sample_size"], merged["sample_size"]


def num_classes(config: dict[str, Any]) -> int:
    """Class embeddings of a UNet with this config (0: unconditional)."""
    return int(config.get("num_class_embeds") or 0)
