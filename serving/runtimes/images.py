"""Image inference: a batch of image requests denoised together (diffusion) or generated in
one forward pass (a GAN's generator), each image from its own seeded noise
(`jobs.seeding`, as `raygen sample` does), returned as PNG bytes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raygen.serving.runtimes.common import torch_dtype

logger = logging.getLogger(__name__)


@dataclass
class ImageTask:
    """Images to generate: image i depends only on (seed, i); any integer seed."""

    n: int
    steps: int
    seed: int
    class_label: int | None = None


class DiffusionModel:
    """A raygen-exported diffusers pipeline (UNet + noise scheduler)."""

    def __init__(self, local_dir: str, precision: str = "fp32", device: str = "cpu"):
        import torch
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

        root = Path(local_dir)
        self.device = torch.device(device)
        saved = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        scheduler_cls = DDIMScheduler if saved["_class_name"] == "DDIMScheduler" else DDPMScheduler
        self.scheduler_config = scheduler_cls.load_config(root / "scheduler")
        self.scheduler_cls = scheduler_cls
        self.unet = UNet2DModel.from_pretrained(
            root / "unet", use_safetensors=True, torch_dtype=torch_dtype(precision)
        ).to(self.device)
        self.unet.eval().requires_grad_(False)
        config = self.unet.config
        self.num_classes = int(config.num_class_embeds or 0)
        self.shape = (config.in_channels, config.sample_size, config.sample_size)
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])

    def generate(self, requests: list[ImageTask]) -> list[np.ndarray]:
        """uint8 images (n, H, W, C) for each request; requests with the same number of
        steps are denoised together as one batch."""
        import torch

        from raygen.jobs.models.diffusion import generate, seeded_noise, to_uint8

        results: list[np.ndarray | None] = [None] * len(requests)
        by_steps: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_steps.setdefault(r.steps, []).append(i)
        for steps, members in by_steps.items():
            noise, labels, generators = [], [], []
            for i in members:
                r = requests[i]
                # Image k of a request depends only on (seed, k): `jobs/seeding.py`.
                request_noise, request_generators = seeded_noise(
                    self.shape, r.seed, list(range(r.n))
                )
                noise.append(request_noise)
                generators += request_generators
                labels += [
                    r.class_label if r.class_label is not None else k % max(1, self.num_classes)
                    for k in range(r.n)
                ]
            label_tensor = torch.tensor(labels, device=self.device) if self.num_classes else None
            scheduler = self.scheduler_cls.from_config(self.scheduler_config)
            images = to_uint8(
                generate(
                    self.unet,
                    scheduler,
                    torch.cat(noise).to(self.device),
                    label_tensor,
                    steps,
                    generators,
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

    def __init__(self, local_dir: str, precision: str = "fp32", device: str = "cpu"):
        import torch

        from raygen.jobs.sampling import load_generator

        self.device = torch.device(device)
        self.generator = load_generator(local_dir).to(self.device, torch_dtype(precision))
        self.generator.requires_grad_(False)
        g = self.generator
        self.num_classes = g.num_classes
        self.shape = (g.channels, g.image_size, g.image_size)

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
