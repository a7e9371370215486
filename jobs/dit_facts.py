"""What a DiT config means, read without importing diffusers (which loads torch): its
problems against the VAE whose latents it is trained on, and the whole config the run
builds. The defaults of diffusers' DiTTransformer2DModel are kept in raygen's cache per
diffusers version (`library_facts`)."""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

from raygen.jobs.library_facts import diffusers_defaults

# DiTPipeline's classifier-free guidance pairs every label with label 1000, "no class": a
# DiT's label table must have 1000 classes (and the extra row for no class) for its export
# to generate with DiTPipeline's default guidance. Labels of the data must be below it.
NULL_CLASS = 1000
DEFAULT_GUIDANCE = 4.0  # classifier-free guidance scale, DiTPipeline's default


def dit_defaults() -> dict[str, Any]:
    """DiTTransformer2DModel's keyword arguments and their defaults."""
    return diffusers_defaults("DiTTransformer2DModel")


def dit_config(config: dict[str, Any], latent_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The DiTTransformer2DModel keyword arguments of `model.config` on latents of
    `latent_shape` (C, H, W): the channels and size the user left out are the latents'."""
    channels, size, _ = latent_shape
    return {"in_channels": channels, "out_channels": channels, "sample_size": size, **config}


def dit_problems(config: dict[str, Any], latent_shape: tuple[int, int, int]) -> list[str]:
    """Problems with a DiT's `model.config` on the VAE's latents (key paths and fixes)."""
    problems = []
    defaults = dit_defaults()
    for key in config:
        if key not in defaults:
            close = get_close_matches(key, sorted(defaults), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"`model.config.{key}`: not a parameter of DiTTransformer2DModel{hint}")
    merged = {**defaults, **dit_config(config, latent_shape)}
    channels, size, _ = latent_shape
    for key, wanted, what in (
        ("in_channels", channels, "the VAE's latent channels"),
        ("out_channels", channels, "the noise it predicts has the latents' channels (raygen "
         "does not train a learned variance)"),
        ("sample_size", size, "the VAE's latent size"),
    ):  # fmt: skip
        if merged[key] != wanted:
            problems.append(
                f"`model.config.{key}`: {merged[key]}, but it must be {wanted}: {what}; "
                "leave it out and raygen sets it from model.vae."
            )
    patch = merged["patch_size"]
    if isinstance(patch, int) and patch >= 1 and size % patch:
        problems.append(
            f"`model.config.patch_size`: {patch} does not divide the latent size {size}; use a "
            "divisor of it (1 or 2 for small latents)."
        )
    if merged["num_embeds_ada_norm"] != NULL_CLASS:
        problems.append(
            f"`model.config.num_embeds_ada_norm`: {merged['num_embeds_ada_norm']}, but "
            f"DiTPipeline guides with label {NULL_CLASS} as 'no class', so the export needs "
            f"{NULL_CLASS}; leave it out (labels 0..{NULL_CLASS - 1} all work)."
        )
    if merged["norm_type"] != "ada_norm_zero":
        problems.append(
            f"`model.config.norm_type`: {merged['norm_type']!r}; a class-conditional DiT uses "
            "ada_norm_zero; leave it out."
        )
    return problems
