"""An exported model directory as the server sees it: which kind of model it is (told from
its files), its dtype, and the error a request's own values raise."""

from __future__ import annotations

import json
import logging

from raygen.cluster.storage import exists, join, read_text
from raygen.jobs.errors import SpecError

logger = logging.getLogger(__name__)


LANGUAGE_MODEL = "language-model"


DIFFUSION = "diffusion"


GAN = "gan"  # a GAN's generator, as raygen exports it
IMAGE_KINDS = (DIFFUSION, GAN)


LM_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
DIT_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class InputError(ValueError):
    """A request the model cannot take because of what it asked for (the server answers
    4xx); any other exception while generating is the server's fault (5xx)."""


def detect_kind(model_dir: str) -> str:
    """`language-model`, `diffusion` or `gan`, told apart by the directory's files.

    Raises:
        SpecError: not an exported model directory, weights that are not safetensors, or
            an export raygen began and did not finish.
    """
    from raygen.cluster.errors import StorageError
    from raygen.cluster.publish import require_complete

    try:
        require_complete(model_dir, "the model", "export it again (`raygen export RUN --out DIR`).")
    except StorageError as exc:
        raise SpecError("model", str(exc)) from None
    index = read_text(join(model_dir, "model_index.json"))
    if index is not None:
        # A UNet's pipeline, or a DiT's (the transformer and the VAE that decodes it).
        from raygen.jobs.sampling import DIT_PIPELINE

        try:
            dit = json.loads(index).get("_class_name") == DIT_PIPELINE
        except (ValueError, AttributeError):
            raise SpecError(
                "model",
                f"{model_dir}'s model_index.json is not a diffusers pipeline index; "
                "export the model again (`raygen export`).",
            ) from None
        wanted = [DIT_WEIGHTS, VAE_WEIGHTS] if dit else [UNET_WEIGHTS]
        for weights in wanted:
            if not exists(join(model_dir, weights)):
                raise SpecError(
                    "model",
                    f"{model_dir} has no {weights}; raygen serves safetensors weights only "
                    "(no pickled .bin files). Re-export the model with `raygen export`.",
                )
        return DIFFUSION
    config = read_text(join(model_dir, "config.json"))
    if config is None:
        where = "does not exist" if not exists(model_dir) else "has no config.json"
        raise SpecError(
            "model",
            f"{model_dir} {where}; give an exported model directory (the `model/` of a "
            "training run, or what `raygen export` wrote), local or in a bucket (s3://, gs://, abfs://).",
        )
    saved = json.loads(config)
    if saved.get("_class_name") == "Generator":
        if not exists(join(model_dir, "model.safetensors")):
            raise SpecError(
                "model",
                f"{model_dir} has no model.safetensors; export the GAN again (`raygen export`).",
            )
        return GAN
    if saved.get("_class_name") == "AutoencoderKL":
        raise SpecError(
            "model",
            f"{model_dir} is a VAE (AutoencoderKL): raygen serves language models and image "
            "generators; decode draws from its prior with `raygen sample`, or train a latent "
            "diffusion model in its latent space.",
        )
    if "model_type" not in saved:
        raise SpecError(
            "model", f"{model_dir}/config.json is not a transformers config (no model_type)."
        )
    if not any(exists(join(model_dir, name)) for name in LM_WEIGHTS):
        raise SpecError(
            "model",
            f"{model_dir} has no {LM_WEIGHTS[0]}; raygen serves safetensors weights only (no "
            "pickled .bin files). Save the model with save_pretrained(safe_serialization=True).",
        )
    if not exists(join(model_dir, "tokenizer.json")):
        raise SpecError(
            "model", f"{model_dir} has no tokenizer.json; export the model with its tokenizer."
        )
    return LANGUAGE_MODEL


def torch_dtype(precision: str):
    import torch

    return getattr(torch, DTYPES[precision])


def has_chat_template(model_dir: str) -> bool:
    """Whether an exported language model's tokenizer has a chat template (read from its
    files: transformers keeps it in chat_template.jinja, or formerly in
    tokenizer_config.json)."""
    if exists(join(model_dir, "chat_template.jinja")):
        return True
    config = read_text(join(model_dir, "tokenizer_config.json"))
    return bool(config and json.loads(config).get("chat_template"))
