"""Diffusion image models from a spec: the UNet, its noise scheduler, loss and sampler.

Pure diffusers/PyTorch. The noise scheduler is separate from the network: the loss and the
sampler take both, so the same UNet trains with one scheduler and samples with another.
Images are float tensors (N, C, H, W) in [-1, 1]; class labels are int64 (N,) or None.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    UNet2DModel,
)

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


def build_noise_scheduler(
    spec: NoiseSchedulerSpec, latent: bool = False
) -> DDPMScheduler | DDIMScheduler:
    """The spec's scheduler; its `add_noise`/`get_velocity` define the training targets.

    Pixels are clipped to [-1, 1] at every step; latents (`latent`) have no such range.
    """
    cls = DDIMScheduler if spec.type == "ddim" else DDPMScheduler
    return cls(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        prediction_type=spec.prediction_type,
        clip_sample=not latent,
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
    net: torch.nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    generators: list[torch.Generator] | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
) -> torch.Tensor:
    """Denoise `noise` (N, C, H, W) in `steps` scheduler steps with a UNet or a DiT.

    Returns images in [-1, 1] (a UNet's; `clip_sample` schedulers), or latents (a DiT's).
    A DDIM scheduler is deterministic (eta = 0): the same noise gives the same images.
    DDPM steps add fresh noise: drawn from `generators` (one per image) when given, so an
    image does not depend on the batch it is generated in; else from torch's global RNG.
    With `guidance_scale` > 1, classifier-free guidance as DiTPipeline does it: the
    prediction for `labels` extrapolated away from the one for `null_class`.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    dtype = next(net.parameters()).dtype
    guided = guidance_scale > 1
    if guided:
        assert labels is not None and null_class is not None
        labels = torch.cat([labels, torch.full_like(labels, null_class)])
    sample = noise
    for t in scheduler.timesteps:
        model_input = torch.cat([sample, sample]) if guided else sample
        # (N,) timesteps: a DiT's timestep embedding takes no scalar.
        timesteps = t.expand(len(model_input))
        prediction = net(model_input.to(dtype), timesteps, class_labels=labels).sample.float()
        # A DiT that learned its variance too (DiT-XL/2's 2C channels): its noise is the first C.
        prediction = prediction[:, : sample.shape[1]]
        if guided:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        sample = scheduler.step(prediction, t, sample, generator=generators).prev_sample
    return sample if not scheduler.config.clip_sample else sample.clamp(-1, 1)


def build_pipeline(
    net: torch.nn.Module,
    scheduler_spec: NoiseSchedulerSpec,
    vae: AutoencoderKL | None = None,
    classes: int = 0,
) -> DiffusionPipeline:
    """The diffusers pipeline that generates with a trained network: DDPMPipeline or
    DDIMPipeline (the spec's scheduler) of a UNet; DiTPipeline of a DiT with its `vae` and
    its `classes` named "0".."K-1" (`pipe.labels`; saved in model_index.json)."""
    if vae is None:
        pipeline_cls = DDIMPipeline if scheduler_spec.type == "ddim" else DDPMPipeline
        return pipeline_cls(unet=net, scheduler=build_noise_scheduler(scheduler_spec))
    id2label = {str(i): str(i) for i in range(classes)}
    scheduler = build_noise_scheduler(scheduler_spec, latent=True)
    pipeline = DiTPipeline(transformer=net, vae=vae, scheduler=scheduler, id2label=id2label)
    pipeline.register_to_config(id2label=id2label)
    return pipeline


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
