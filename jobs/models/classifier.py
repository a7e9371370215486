"""A small CNN image classifier whose penultimate layer gives FID features (pure PyTorch).

The standard practice for MNIST-like data, where Inception features mean little: train a
classifier on the real images, then compare real and generated images in its feature space.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """conv 32 -> conv 64 /2 -> conv 128 /2 -> global average pool -> linear."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.Conv2d(64, FEATURE_DIM, 3, stride=2, padding=1),
            nn.GroupNorm(8, FEATURE_DIM),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, 128) features."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (N, classes) logits


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 8,
    seed: int = 0,
) -> DigitsClassifier:
    """Fit the classifier on (N, C, H, W) images in [-1, 1] with int64 labels (N,)."""
    torch.manual_seed(seed)
    model = DigitsClassifier(images.shape[1], num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(b).argmax(-1) for b in images.split(256)])
    return (predictions == labels).float().mean().item()
