"""Sample images from an exported image model directory (`<run>/model`, local or in a
bucket: a diffusion pipeline, or a VAE decoding draws from its prior), and write images:
one PNG each, or tiled into a grid."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raygen.cluster.publish import require_complete
from raygen.cluster.storage import join, local_copy, read_text
from raygen.jobs.errors import SpecError

DIT_PIPELINE = "DiTPipeline"  # model_index.json's _class_name of a latent diffusion export


def sample_model(
    model_dir: str,
    n: int,
    steps: int,
    class_label: int | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    guidance_scale: float | None = None,
) -> tuple[np.ndarray, list[int] | None]:
    """Generate `n` images with a raygen-exported (diffusers) pipeline directory, or with a
    GAN's generator, or decode `n` draws from a VAE's prior.

    Args:
        model_dir: a diffusion pipeline directory (model_index.json: a UNet's, or a DiT's
            with its VAE), a GAN generator's or an AutoencoderKL directory.
        steps: denoising steps (a VAE or GAN generates in one pass).
        class_label: the class of every image (conditional models); default: cycle 0..K-1.
        seed: image i's starting noise depends only on (seed, i).
        scheduler: `ddpm` or `ddim` to override the saved scheduler type.
        guidance_scale: a DiT's classifier-free guidance (default DiTPipeline's, 4).

    Returns:
        (uint8 images (n, H, W, C), the class label of each image or None).

    Raises:
        SpecError: not an image model directory, or a class label or guidance it cannot take.
    """
    import torch

    from raygen.jobs.models.diffusion import seeded_noise, to_uint8

    require_complete(model_dir, "MODEL_DIR", "export it again (`raygen export RUN --out DIR`).")
    one_pass = {"AutoencoderKL": "a VAE", "Generator": "a GAN's generator"}
    kind = _class_name(model_dir)
    if kind in one_pass and guidance_scale is not None:
        raise SpecError(
            "--guidance-scale",
            f"{model_dir} is {one_pass[kind]}, which has no classifier-free guidance (latent "
            "diffusion models do); drop --guidance-scale.",
        )
    if kind == "AutoencoderKL":
        return _sample_vae(model_dir, n, class_label, seed), None
    if kind == "Generator":
        return _sample_generator(model_dir, n, class_label, seed)
    model = load_diffusion(model_dir)
    labels = _labels(model_dir, model.classes, class_label, n)
    guidance = model.guidance(guidance_scale, "--guidance-scale")
    images = []
    for start in range(0, n, 64):
        indices = list(range(start, min(n, start + 64)))
        label_tensor = torch.tensor([labels[i] for i in indices]) if labels else None
        # The image API's rule: image i depends only on (seed, i), DDPM's fresh noise too.
        noise, generators = seeded_noise(model.shape, seed, indices)
        images.append(model.generate(noise, label_tensor, steps, generators, guidance, scheduler))
    return to_uint8(torch.cat(images)), labels


@dataclass
class Diffusion:
    """An exported diffusion pipeline's parts: the network (a UNet, or a DiT), the VAE that
    decodes a DiT's latents (None for a UNet), the saved scheduler, the classes (0:
    unconditional), the shape (C, H, W) of the noise it starts from and that of the images
    it makes (a DiT's are its latents' decoded)."""

    net: Any
    vae: Any
    scheduler_config: dict[str, Any]
    classes: int
    shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    def guidance(self, scale: float | None, key: str) -> float:
        """The classifier-free guidance scale to use: `scale`, else a DiT's default.

        Raises:
            SpecError: guidance asked of a UNet (which learned no 'no class' prediction).
        """
        from raygen.jobs.dit_facts import DEFAULT_GUIDANCE

        if self.vae is None:
            if scale is not None and scale != 1:
                raise SpecError(
                    key,
                    "classifier-free guidance needs a model that learned a 'no class' "
                    "prediction (a DiT); this UNet generates without it: drop the guidance "
                    "scale.",
                )
            return 1.0
        return DEFAULT_GUIDANCE if scale is None else scale

    def generate(
        self,
        noise: Any,
        labels: Any,
        steps: int,
        generators: list[Any] | None,
        guidance_scale: float = 1.0,
        scheduler: str | None = None,
    ) -> Any:
        """Images (N, C, H, W) in [-1, 1] from `noise` (`jobs.models.diffusion.generate`),
        decoded by the VAE for a DiT; `scheduler` (ddpm, ddim) overrides the saved one."""
        from diffusers import DDIMScheduler, DDPMScheduler

        from raygen.jobs.dit_facts import NULL_CLASS
        from raygen.jobs.models.diffusion import generate
        from raygen.jobs.models.dit import decode_scaled

        saved_ddim = self.scheduler_config["_class_name"] == "DDIMScheduler"
        use_ddim = scheduler == "ddim" or (scheduler is None and saved_ddim)
        sampler = (DDIMScheduler if use_ddim else DDPMScheduler).from_config(self.scheduler_config)
        x = generate(
            self.net, sampler, noise, labels, steps, generators, guidance_scale, NULL_CLASS
        )
        return x if self.vae is None else decode_scaled(self.vae, x)


def load_diffusion(model_dir: str, dtype: Any = None, device: str = "cpu") -> Diffusion:
    """A raygen-exported diffusion pipeline directory (local or in a bucket), in eval mode,
    its weights in `dtype` (default float32).

    Raises:
        SpecError: not a DDPM/DDIM or DiT pipeline directory, or one that does not load.
    """
    import torch
    from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel

    index_text = read_text(join(model_dir, "model_index.json"))
    config_text = read_text(join(model_dir, "scheduler", "scheduler_config.json"))
    try:
        index = json.loads(index_text) if index_text else None
        scheduler_config = json.loads(config_text) if config_text else None
    except ValueError:
        index = scheduler_config = None
    if not isinstance(index, dict) or not isinstance(scheduler_config, dict):
        raise SpecError(
            "MODEL_DIR",
            f"{model_dir} is not an image model directory (a diffusion pipeline's "
            "model_index.json and scheduler/, or a VAE's or GAN generator's config.json); "
            "give the `model/` directory of a diffusion, VAE or GAN training run.",
        )
    local = Path(local_copy(model_dir))
    options = {"use_safetensors": True, "torch_dtype": dtype or torch.float32}
    vae = None
    try:
        if index.get("_class_name") == DIT_PIPELINE:  # a DiT on the latents of its vae/
            net = DiTTransformer2DModel.from_pretrained(local / "transformer", **options)
            vae = AutoencoderKL.from_pretrained(local / "vae", **options).to(device)
            vae.eval().requires_grad_(False)
            # Its classes: those the export names (id2label), else every label-table row.
            classes = len(index.get("id2label") or {}) or int(net.config.num_embeds_ada_norm)
        else:
            net = UNet2DModel.from_pretrained(local / "unet", **options)
            classes = int(net.config.num_class_embeds or 0)
    except (OSError, ValueError) as exc:
        raise SpecError(
            "MODEL_DIR",
            f"{model_dir} does not load as a {index.get('_class_name')} with safetensors "
            f"weights ({str(exc).splitlines()[0]}); export it again (`raygen export`).",
        ) from None
    net = net.to(device).eval().requires_grad_(False)
    config = net.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    image_shape = shape
    if vae is not None:  # the decoder doubles the size in every block but the last
        size = config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        image_shape = (vae.config.out_channels, size, size)
    return Diffusion(net, vae, scheduler_config, classes, shape, image_shape)


def _labels(model_dir: str, classes: int, class_label: int | None, n: int) -> list[int] | None:
    """The class of each of `n` images: `class_label`, else 0..K-1 in turn; None for an
    unconditional model (which takes no --class-label)."""
    if class_label is not None and not classes:
        raise SpecError(
            "--class-label", f"{model_dir} is an unconditional model; drop --class-label."
        )
    if class_label is not None and not 0 <= class_label < classes:
        raise SpecError(
            "--class-label",
            f"{class_label} is out of range: the model knows classes 0..{classes - 1}.",
        )
    if not classes:
        return None
    return [class_label if class_label is not None else i % classes for i in range(n)]


def _class_name(model_dir: str) -> str | None:
    text = read_text(join(model_dir, "config.json"))
    try:
        return json.loads(text).get("_class_name") if text else None
    except (ValueError, AttributeError):
        return None


def _sample_vae(model_dir: str, n: int, class_label: int | None, seed: int) -> np.ndarray:
    """Decode `n` draws from the VAE's prior, draw i depending only on (seed, i)."""
    import torch
    from diffusers import AutoencoderKL

    from raygen.jobs.models.diffusion import seeded_noise, to_uint8
    from raygen.jobs.models.vae import decode_latents

    if class_label is not None:
        raise SpecError("--class-label", f"{model_dir} is a VAE, which is unconditional.")
    try:
        vae = AutoencoderKL.from_pretrained(local_copy(model_dir)).eval()
    except (OSError, ValueError) as exc:
        raise SpecError(
            "MODEL_DIR", f"{model_dir} is not a loadable VAE ({str(exc).splitlines()[0]})."
        ) from None
    blocks = len(vae.config.block_out_channels)
    size = vae.config.sample_size // 2 ** (blocks - 1)
    shape = (vae.config.latent_channels, size, size)
    images = []
    for start in range(0, n, 64):
        noise, _ = seeded_noise(shape, seed, list(range(start, min(n, start + 64))))
        images.append(decode_latents(vae, noise))
    return to_uint8(torch.cat(images))


def load_generator(model_dir: str) -> Any:
    """A GAN export's generator (raygen's own DCGAN class: the export's `dcgan.py` is the
    same source, for loading without raygen), in eval mode on the CPU."""
    from safetensors.torch import load_file

    from raygen.jobs.models.dcgan import Generator

    local = Path(local_copy(model_dir))
    config = json.loads((local / "config.json").read_text())
    weights = local / "model.safetensors"
    if not weights.is_file() or "kwargs" not in config:
        raise SpecError(
            "MODEL_DIR",
            f"{model_dir} is not a whole GAN export (model.safetensors and config.json's "
            "kwargs); export it again (`raygen export RUN --out DIR`).",
        )
    generator = Generator(**config["kwargs"])
    generator.load_state_dict(load_file(str(weights)))
    return generator.eval()


def _sample_generator(
    model_dir: str, n: int, class_label: int | None, seed: int
) -> tuple[np.ndarray, list[int] | None]:
    """`n` images of a GAN's generator, image i depending only on (seed, i)."""
    import torch

    from raygen.jobs.models.diffusion import seeded_noise, to_uint8

    generator = load_generator(model_dir)
    labels = _labels(model_dir, generator.num_classes, class_label, n)
    images = []
    with torch.no_grad():
        for start in range(0, n, 256):
            indices = list(range(start, min(n, start + 256)))
            latents, _ = seeded_noise((generator.latent_dim,), seed, indices)
            label_tensor = torch.tensor([labels[i] for i in indices]) if labels else None
            images.append(generator(latents, label_tensor))
    return to_uint8(torch.cat(images)), labels


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) row by row into one (rows*H', columns*W', C) image."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write a uint8 (H, W, C) image as PNG, enlarged `scale` times (nearest neighbour)."""
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    pil.save(path)
