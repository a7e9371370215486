"""GAN objectives: the adversarial losses and the R1 penalty. Pure PyTorch.

Scores are the discriminator's raw outputs (N,), float; higher means "real".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raygen.jobs.models.dcgan import Discriminator, Generator
from raygen.jobs.spec import ModelSpec


def build_gan(model: ModelSpec) -> tuple[Generator, Discriminator]:
    """The spec's DCGAN generator and discriminator (random weights)."""
    kwargs = dict(model.config)
    generator = Generator(**kwargs)
    kwargs.pop("latent_dim", None)
    return generator, Discriminator(**kwargs)


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss of the scores of real and generated images: the logistic loss
    (softplus(-real) + softplus(fake)) or the hinge loss (relu(1 - real) + relu(1 + fake))."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's loss on its images' scores: non-saturating softplus(-fake), or the
    hinge loss's -fake."""
    fake = fake.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def r1_penalty(real_scores: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of the scores' gradient with respect to the real images (which
    must require grad), kept in the graph so that it trains the discriminator."""
    (grad,) = torch.autograd.grad(real_scores.float().sum(), real_images, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()
