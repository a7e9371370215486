"""What a DCGAN config means, read without importing torch: its problems, the image shape
and the classes of a GAN built from it."""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

# `jobs.models.dcgan.Generator`'s keyword arguments and defaults (a test holds them equal).
DCGAN_DEFAULTS = {
    "latent_dim": 64,
    "channels": 3,
    "image_size": 32,
    "base_channels": 64,
    "num_classes": 0,
}


def gan_problems(config: dict[str, Any], has_labels: bool) -> list[str]:
    """Problems with a DCGAN config (key paths and fixes) found without building it."""
    problems = []
    for key in config:
        if key not in DCGAN_DEFAULTS:
            close = get_close_matches(key, sorted(DCGAN_DEFAULTS), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(
                f"`model.config.{key}`: not a parameter of raygen's DCGAN (its parameters: "
                f"{', '.join(DCGAN_DEFAULTS)}){hint}"
            )
    merged = {**DCGAN_DEFAULTS, **config}
    size = merged["image_size"]
    if not isinstance(size, int) or size < 4 or size & (size - 1):
        problems.append(
            f"`model.config.image_size`: {size} is not a power of two of at least 4; the "
            "generator doubles a 4x4 start up to it (8, 16, 32, 64...)."
        )
    for key in ("latent_dim", "base_channels", "channels"):
        if not isinstance(merged[key], int) or merged[key] < 1:
            problems.append(f"`model.config.{key}`: give a positive integer.")
    if has_labels and not merged["num_classes"]:
        problems.append(
            "`model.config.num_classes`: the data has class labels for conditional training, "
            "but the GAN has no classes; set num_classes to the number of classes (or drop "
            "data.label_column to train unconditionally)."
        )
    return problems


def image_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the images a DCGAN with this config makes."""
    merged = {**DCGAN_DEFAULTS, **config}
    return merged["channels"], merged["image_size"], merged["image_size"]


def num_classes(config: dict[str, Any]) -> int:
    return int({**DCGAN_DEFAULTS, **config}["num_classes"] or 0)
