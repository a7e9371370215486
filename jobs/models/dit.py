"""Latent diffusion with a diffusion transformer (DiT): diffusers' DiTTransformer2DModel,
class-conditional, on the latents of a frozen AutoencoderKL.

Pure diffusers/PyTorch. A latent is a draw from the VAE's posterior times the VAE's
`scaling_factor` (about unit variance), which is what DiTPipeline divides by to decode.
The noise scheduler, loss and sampler are the UNet's (`jobs.models.diffusion`).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch import nn

from raygen.jobs.dit_facts import NULL_CLASS
from raygen.jobs.models.vae import decode_latents

# Share of training labels replaced by "no class", so that the same transformer learns
# the unconditional prediction classifier-free guidance needs (DiT's 10%).
LABEL_DROPOUT = 0.1


def build_dit(config: dict) -> DiTTransformer2DModel:
    """Random weights, initialized as DiT's reference code does (Peebles & Xie, 2023):
    Xavier linear layers, N(0, 0.02) label and timestep embeddings, and zeros for every
    adaLN modulation and the output layer, so each block starts as the identity.

    Labels are dropped for guidance by `drop_labels`, the same images in every block:
    diffusers' blocks would each drop their own, so their own dropping is turned off.
    """
    net = DiTTransformer2DModel(**config)

    def xavier(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    net.apply(xavier)
    patch = net.pos_embed.proj.weight.data  # a convolution used as a linear layer per patch
    nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
    nn.init.zeros_(net.pos_embed.proj.bias)
    for block in net.transformer_blocks:
        embedding = block.norm1.emb
        nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        embedding.class_embedder.dropout_prob = 0.0
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (net.proj_out_1, net.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


def drop_labels(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels (N,) with LABEL_DROPOUT of them replaced by the null class, at random."""
    dropped = torch.rand(labels.shape, generator=generator).to(labels.device) < LABEL_DROPOUT
    return torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """Latents from the VAE's posterior N(mean, std^2) (N, C, h, w): a draw with `noise`,
    or the mean without; scaled by the VAE's scaling factor."""
    latents = mean if noise is None else mean + std * noise
    return latents * scaling_factor


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and standard deviation (N, C, h, w) of images in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


@torch.no_grad()
def decode_scaled(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, C, H, W) in [-1, 1], as DiTPipeline decodes."""
    return decode_latents(vae, latents / vae.config.scaling_factor)
