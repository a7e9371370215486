"""Diffusion image models from a spec: the UNet, its noise scheduler, loss and sampler.

Pure diffusers/PyTorch. The noise scheduler is separate from the network: the loss and the
sampler take both, so the same UNet trains with one scheduler and samples with another.
Images are float tensors (N, C, H, W) in [-1, 1]; class labels are int64 (N,) or None.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from raygen.jobs.seeding import item_generator
from raygen.jobs.spec import ModelSpec, NoiseSchedulerSpec


def build_unet(model: ModelSpec, pretrained_unet: str | None = None) -> UNet2DModel:
    """Random weights for `arch: unet2d`; with `pretrained_unet` (a local UNet directory,
    `jobs.pretrained.unet_dir` of the spec's pretrained model), its saved weights (fp32)."""
    if pretrained_unet:
        net = UNet2DModel.from_pretrained(pretrained_unet, torch_dtype=torch.float32)
    else:
        net = UNet2DModel(**model.config)
    if model.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    return net


def build_noise_scheduler(spec: NoiseSchedulerSpec) -> DDPMScheduler | DDIMScheduler:
    """The spec's scheduler; its `add_noise`/`get_velocity` define the training targets."""
    cls = DDIMScheduler if spec.type == "ddim" else DDPMScheduler
    return cls(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        prediction_type=spec.prediction_type,
        clip_sample=True,
    )


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of the network's prediction at noise level `timesteps` (N,).

    The target is the noise (epsilon) or the velocity v, per the scheduler's prediction type.
    """
    noisy = scheduler.add_noise(images, noise, timesteps)  # (N, C, H, W)
    prediction = unet(noisy, timesteps, class_labels=labels).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(images, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Denoise `noise` (N, C, H, W) in `steps` scheduler steps; returns images in [-1, 1].

    A DDIM scheduler is deterministic (eta = 0): the same noise gives the same images.
    DDPM steps add fresh noise: drawn from `generators` (one per image) when given, so an
    image does not depend on the batch it is generated in; else from torch's global RNG.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    dtype = next(unet.parameters()).dtype
    sample = noise
    for t in scheduler.timesteps:
        model_output = unet(sample.to(dtype), t, class_labels=labels).sample.float()
        sample = scheduler.step(model_output, t, sample, generator=generators).prev_sample
    return sample.clamp(-1, 1)


def seeded_noise(
    shape: tuple[int, int, int], seed: int, indices: list[int]
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Noise (len(indices), *shape) where image i's noise depends only on (seed, i), and
    each image's generator, left where its noise ends: `generate` draws a DDPM sampler's
    fresh noise from it, so the whole image depends only on (seed, i).

    So sample i is the same whatever the number of workers, batch or request it is
    generated in (`jobs/seeding.py`: any integer seed, no overflow).
    """
    generators = [item_generator(seed, index) for index in indices]
    out = torch.empty(len(indices), *shape)
    for row, generator in enumerate(generators):
        out[row] = torch.randn(shape, generator=generator)
    return out, generators


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) -> uint8 (N, H, W, C)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
