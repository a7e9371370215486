"""Variational autoencoders of images from a spec: diffusers' AutoencoderKL, its training
objective, reconstruction and sampling from the prior.

Pure diffusers/PyTorch. Images are float tensors (N, C, H, W) in [-1, 1]; latents are
(N, latent_channels, H / 2^(blocks-1), W / 2^(blocks-1)).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from raygen.jobs.spec import ModelSpec


def build_vae(model: ModelSpec, pretrained_vae: str | None = None) -> AutoencoderKL:
    """Random weights for `arch: autoencoder_kl`; with `pretrained_vae` (a local
    AutoencoderKL directory), its saved weights (fp32)."""
    if pretrained_vae:
        vae = AutoencoderKL.from_pretrained(pretrained_vae, torch_dtype=torch.float32)
    else:
        vae = AutoencoderKL(**model.config)
    if model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return vae


class VaeObjective(torch.nn.Module):
    """The VAE's training forward as one module, so DeepSpeed wraps (and ZeRO-3 partitions)
    encoder and decoder alike: images -> (reconstruction loss, KL, sampled latents)."""

    def __init__(self, vae: AutoencoderKL, reconstruction: str):
        super().__init__()
        self.vae = vae
        self.reconstruction = reconstruction

    def forward(
        self, images: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, draw latents from the posterior (its mean with `sample=False`), decode.

        Returns:
            (reconstruction loss: the mean per-pixel l1 or l2 error, KL: the mean over latent
            elements of KL(posterior || N(0, 1)), latents (N, c, h, w), reconstructions
            (N, C, H, W)), losses as float32 scalars.
        """
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if sample else posterior.mode()
        decoded = self.vae.decode(latents).sample
        error = decoded.float() - images.float()
        loss = error.abs().mean() if self.reconstruction == "l1" else error.square().mean()
        return loss, kl_divergence(posterior.mean, posterior.logvar), latents, decoded


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged: a float32 scalar.
    (diffusers' `DiagonalGaussianDistribution.kl()` is its sum over each image's latents.)"""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents of the prior's scale (unscaled: N(0, 1) draws)."""
    dtype = next(vae.parameters()).dtype
    return vae.decode(latents.to(dtype)).sample.float().clamp(-1, 1)
