"""DCGAN (Radford et al., 2016) for small images, class-conditional when given classes.

Self-contained PyTorch (this file imports torch only): a GAN's export copies it beside the
generator's weights, so the generator loads with plain PyTorch, no raygen installed.
Images are float tensors (N, C, H, W) in [-1, 1]; labels int64 (N,) or None; latents (N, D).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _stages(image_size: int) -> int:
    """Doublings from the 4x4 start to `image_size` (a power of two, at least 4)."""
    stages = math.log2(image_size / 4) if image_size >= 4 else -1
    if stages < 0 or stages != int(stages):
        raise ValueError(f"image_size must be 4, 8, 16, 32, ... (a power of two), not {image_size}")
    return int(stages)


def _groups(channels: int) -> int:
    """Groups of a group norm over `channels`: 8 channels each, or one group."""
    return max(1, channels // 8)


class Generator(nn.Module):
    """Latents (and labels) -> images: a projection to 4x4, then one transposed convolution
    per doubling (group norm, ReLU), a 3x3 convolution to the image's channels and tanh.
    Class-conditional models append a learned embedding of the label to the latent."""

    def __init__(
        self,
        latent_dim: int = 64,
        channels: int = 3,
        image_size: int = 32,
        base_channels: int = 64,
        num_classes: int = 0,
    ):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.channels, self.image_size = channels, image_size
        stages = _stages(image_size)
        width = base_channels * 2**stages
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        inputs = 2 * latent_dim if num_classes else latent_dim  # the latent, and its label's
        self.project = nn.Linear(inputs, width * 16, bias=False)
        self.start = nn.Sequential(nn.GroupNorm(_groups(width), width), nn.ReLU(inplace=True))
        blocks = []
        for _ in range(stages):
            blocks += [
                nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(_groups(width // 2), width // 2),
                nn.ReLU(inplace=True),
            ]
            width //= 2
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Sequential(nn.Conv2d(width, channels, 3, padding=1), nn.Tanh())

    def forward(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("a class-conditional generator needs labels")
            latents = torch.cat([latents, self.embed(labels)], 1)
        h = self.project(latents)  # (N, width * 16)
        h = self.start(h.view(len(h), -1, 4, 4))
        return self.to_image(self.blocks(h))


class Discriminator(nn.Module):
    """Images (and labels) -> one score each: a 3x3 convolution, then one strided 4x4
    convolution per halving (LeakyReLU), a linear score; class-conditional models add the
    projection of the features on their label's embedding (Miyato & Koyama, 2018)."""

    def __init__(
        self, channels: int = 3, image_size: int = 32, base_channels: int = 64, num_classes: int = 0
    ):
        super().__init__()
        width = base_channels
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(_stages(image_size)):
            layers += [nn.Conv2d(width, width * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width *= 2
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(width * 16, 1)
        self.embed = nn.Embedding(num_classes, width * 16) if num_classes else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(images).flatten(1)  # (N, width * 16)
        out = self.score(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a class-conditional discriminator needs labels")
            out = out + (self.embed(labels) * h).sum(1)
        return out  # (N,)
