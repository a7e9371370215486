"""Image inference: a batch of image requests denoised together (diffusion) or generated in
one forward pass (a GAN's generator), each image from its own seeded noise
(`jobs.seeding`, as `raygen sample` does), returned as PNG bytes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from raygen.serving.runtimes.common import InputError, torch_dtype

logger = logging.getLogger(__name__)


@dataclass
class ImageTask:
    """Images to generate: image i depends only on (seed, i); any integer seed."""

    n: int
    steps: int
    seed: int
    class_label: int | None = None
    guidance_scale: float | None = None  # a DiT's; None: its default


class DiffusionModel:
    """A raygen-exported diffusers pipeline: a UNet and its noise scheduler, or a DiT with
    the VAE that decodes its latents (`jobs.sampling.load_diffusion`)."""

    def __init__(self, local_dir: str, precision: str = "fp32", device: str = "cpu"):
        from raygen.jobs.sampling import load_diffusion

        self.model = load_diffusion(local_dir, torch_dtype(precision), device)
        self.device = device
        self.num_classes = self.model.classes
        self.image_shape = self.model.image_shape  # (C, H, W) of the images it returns
        self.num_train_timesteps = self.model.num_train_timesteps
        self.guides = self.model.vae is not None  # a DiT takes a guidance scale

    def generate(self, requests: list[ImageTask]) -> list[np.ndarray]:
        """uint8 images (n, H, W, C) for each request; requests with the same number of
        steps (and guidance) are denoised together as one batch.

        Raises:
            InputError: guidance asked of a model without it.
        """
        import torch

        from raygen.jobs.errors import SpecError
        from raygen.jobs.models.diffusion import seeded_noise, to_uint8

        results: list[np.ndarray | None] = [None] * len(requests)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, r in enumerate(requests):
            try:
                guidance = self.model.guidance(r.guidance_scale, "guidance_scale")
            except SpecError as exc:
                raise InputError(str(exc)) from None
            groups.setdefault((r.steps, guidance), []).append(i)
        for (steps, guidance), members in groups.items():
            noise, labels, generators = [], [], []
            for i in members:
                r = requests[i]
                # Image k of a request depends only on (seed, k): `jobs/seeding.py`.
                request_noise, request_generators = seeded_noise(
                    self.model.shape, r.seed, list(range(r.n))
                )
                noise.append(request_noise)
                generators += request_generators
                labels += [
                    r.class_label if r.class_label is not None else k % max(1, self.num_classes)
                    for k in range(r.n)
                ]
            label_tensor = torch.tensor(labels, device=self.device) if self.num_classes else None
            images = to_uint8(
                self.model.generate(
                    torch.cat(noise).to(self.device), label_tensor, steps, generators, guidance
                )
            )
            start = 0
            for i in members:
                results[i] = images[start : start + requests[i].n]
                start += requests[i].n
        return results  # type: ignore[return-value]


class GeneratorModel:
    """A raygen-exported GAN generator: one forward pass per batch."""

    num_train_timesteps = 1  # the image API's `num_inference_steps` can only be 1
    guides = False

    def __init__(self, local_dir: str, precision: str = "fp32", device: str = "cpu"):
        import torch

        from raygen.jobs.sampling import load_generator

        self.device = torch.device(device)
        self.generator = load_generator(local_dir).to(self.device, torch_dtype(precision))
        self.generator.requires_grad_(False)
        g = self.generator
        self.num_classes = g.num_classes
        self.image_shape = (g.channels, g.image_size, g.image_size)

    def generate(self, requests: list[ImageTask]) -> list[np.ndarray]:
        """uint8 images (n, H, W, C) for each request, every request's images in one batch."""
        import torch

        from raygen.jobs.models.diffusion import seeded_noise, to_uint8

        latents, labels = [], []
        for r in requests:
            # Image k of a request depends only on (seed, k): `jobs/seeding.py`.
            request_latents, _ = seeded_noise(
                (self.generator.latent_dim,), r.seed, list(range(r.n))
            )
            latents.append(request_latents)
            labels += [
                r.class_label if r.class_label is not None else k % max(1, self.num_classes)
                for k in range(r.n)
            ]
        dtype = next(self.generator.parameters()).dtype
        label_tensor = torch.tensor(labels, device=self.device) if self.num_classes else None
        with torch.no_grad():
            images = to_uint8(
                self.generator(torch.cat(latents).to(self.device, dtype), label_tensor)
            )
        results, start = [], 0
        for r in requests:
            results.append(images[start : start + r.n])
            start += r.n
        return results


def image_model(local_dir: str, kind: str, precision: str = "fp32", device: str = "cpu") -> Any:
    """The image runtime of an exported model directory of `kind` (`detect_kind`)."""
    from raygen.serving.runtimes.common import GAN

    cls = GeneratorModel if kind == GAN else DiffusionModel
    return cls(local_dir, precision, device)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, C) image as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()
