"""Everything wrong with a train spec that can be found before Ray is asked for anything,
one line per problem (key path, what is wrong, how to fix it). Imports no torch and no Ray:
`raygen train --check` and `raygen submit` start fast; a model family's own checks
import its library (transformers, diffusers) only when asked."""

from __future__ import annotations

import json
from pathlib import Path

from raygen.cluster.storage import exists, is_remote, join, read_text
from raygen.jobs.data.chat import BUILTIN_TEMPLATES
from raygen.jobs.data.images import check_image_columns
from raygen.jobs.data.inputs import check_columns, list_input_files, source_columns
from raygen.jobs.errors import SpecError
from raygen.jobs.library_facts import recall, remember
from raygen.jobs.pretrained import (
    image_model_config,
    latent_shape_of,
    latent_vae_problems,
    pretrained_problems,
    unet_config,
)
from raygen.jobs.spec import (
    BUILTIN_IMAGES,
    BUILTIN_PREFIX,
    DIT_ARCHS,
    GAN_ARCHS,
    IMAGE_FAMILIES,
    VAE_ARCHS,
    ModelSpec,
    TrainSpec,
)
from raygen.jobs.train.deepspeed_config import deepspeed_config_problems
from raygen.jobs.unet_facts import num_classes, unet_problems
from raygen.jobs.vae_facts import vae_problems

BUILTIN_DIGITS = next(iter(BUILTIN_IMAGES))


def resolve_paths(spec: TrainSpec) -> TrainSpec:
    """Make local paths absolute, so workers (running elsewhere) find them."""

    def absolute(path: str | None) -> str | None:
        if path is None or path.startswith(BUILTIN_PREFIX) or "://" in path:
            return path
        return str(Path(path).expanduser().resolve())

    data = spec.model_dump()
    data["data"]["train"] = [absolute(p) for p in spec.data.train]
    data["data"]["eval"] = [absolute(p) for p in spec.data.eval] if spec.data.eval else None
    data["data"]["prepared"] = absolute(spec.data.prepared)
    data["model"]["pretrained"] = absolute(spec.model.pretrained)
    data["model"]["vae"] = absolute(spec.model.vae)
    data["tokenizer"]["path"] = absolute(spec.tokenizer.path)
    data["run"]["storage"] = absolute(spec.run.storage)
    data["sampling"]["inception_weights"] = absolute(spec.sampling.inception_weights)
    return TrainSpec.model_validate(data)


def spec_problems(spec: TrainSpec) -> list[str]:
    """Everything wrong with a spec that can be found without Ray: one line per problem."""
    problems = _common_problems(spec)
    if spec.model.family in IMAGE_FAMILIES:
        return problems + _image_problems(spec)
    return problems + _language_model_problems(spec)


def portable_problems(spec: TrainSpec) -> list[str]:
    """Problems found from the spec alone, without reading any file (checked before a
    spec is submitted to a cluster, whose files may differ from this machine's)."""
    return _common_problems(spec)


def _common_problems(spec: TrainSpec) -> list[str]:
    problems: list[str] = []
    t, ds, sc = spec.train, spec.deepspeed, spec.scaling
    if t.precision == "fp16" and not sc.use_gpu:
        problems.append(
            "`train.precision`: fp16 needs GPUs (DeepSpeed has no fp16 on CPU); use bf16 or "
            "fp32, or set scaling.use_gpu: true."
        )
    if ds.offload_params != "none" and ds.zero_stage != 3:
        problems.append(
            f"`deepspeed.offload_params`: parameter offload needs zero_stage: 3 (got "
            f"{ds.zero_stage}); set deepspeed.zero_stage: 3 or offload_params: none."
        )
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        problems.append(
            "`deepspeed.offload_optimizer`: optimizer offload needs zero_stage 1-3; "
            "raise deepspeed.zero_stage."
        )
    per_worker = sc.resources_per_worker or {}
    if sc.use_gpu and per_worker.get("GPU", 1) <= 0:
        problems.append("`scaling.resources_per_worker.GPU`: must be > 0 with use_gpu: true.")
    if sc.accelerator_type and not sc.use_gpu:
        problems.append(
            f"`scaling.accelerator_type`: {sc.accelerator_type} is a GPU model; set "
            "scaling.use_gpu: true (or drop accelerator_type)."
        )
    if t.d_steps_per_g != 1 and spec.model.family != "gan":
        problems.append(
            "`train.d_steps_per_g`: only a GAN has a discriminator; remove it (or set "
            "model.family: gan)."
        )
    if t.warmup_steps >= t.max_steps and t.warmup_steps > 0:
        problems.append(
            f"`train.warmup_steps`: {t.warmup_steps} warm-up steps but max_steps is "
            f"{t.max_steps}; use fewer warm-up steps."
        )
    problems += deepspeed_config_problems(spec, sc.num_workers)
    return problems


def _language_model_problems(spec: TrainSpec) -> list[str]:
    problems = []
    for key in ("scheduler", "ema"):
        if getattr(spec.model, key) is not None:
            problems.append(
                f"`model.{key}`: only diffusion models have a {key}; remove it or set "
                "model.family: diffusion."
            )
    if BUILTIN_DIGITS in spec.data.train:
        problems.append(
            f"`data.train`: {BUILTIN_DIGITS} is an image data set; a causal-lm trains on text "
            "(e.g. builtin:python-stdlib), or set model.family: diffusion."
        )
        return problems
    if spec.model.pretrained and spec.tokenizer.train:
        problems.append(
            "`tokenizer.train`: a pretrained model's embeddings belong to its own tokenizer; "
            "remove tokenizer.train (its tokenizer is used) or train from `model.arch`."
        )
    if spec.model.pretrained:
        problems += pretrained_problems(spec.model)
    else:
        problems += _lm_config_problems(spec.model)
    if spec.tokenizer.path and not exists(join(spec.tokenizer.path, "tokenizer_config.json")):
        problems.append(
            f"`tokenizer.path`: {spec.tokenizer.path} is not a tokenizer directory (no "
            "tokenizer_config.json); save one with tokenizer.save_pretrained(dir)."
        )
    if spec.model.lora and isinstance(spec.model.lora.target_modules, list) and not problems:
        problems += _lora_target_problems(spec)
    d = spec.data
    if d.format == "chat":
        problems += _chat_problems(spec)
    else:
        if spec.train.loss_on == "assistant":
            problems.append(
                "`train.loss_on`: assistant needs conversations; set data.format: chat, or "
                "loss_on: all."
            )
        if spec.tokenizer.chat_template:
            problems.append(
                "`tokenizer.chat_template`: a template renders conversations; set "
                "data.format: chat, or remove it."
            )
    columns = {
        column: f"data.{name}_column" if name != "messages" else "data.messages_column"
        for column, name in source_columns(d).items()
    }
    weighting = spec.train.group_weighting
    if weighting and d.format == "chat":
        problems.append(
            "`train.group_weighting`: group weighting works on text documents (format text); "
            "remove it for chat data."
        )
    elif weighting:
        builtin = [e for e in d.train + (d.eval or []) if e.startswith(BUILTIN_PREFIX)]
        if builtin:
            problems.append(
                f"`train.group_weighting`: {', '.join(builtin)} has no group column; group "
                "weighting needs Parquet data with a column naming each document's group."
            )
        columns[weighting.column] = "train.group_weighting.column"
    for key, entries in (("data.train", d.train), ("data.eval", d.eval or [])):
        try:
            check_columns(list_input_files(entries, key, None), columns, key)
        except SpecError as exc:
            problems += exc.problems
    return problems


def _lora_target_problems(spec: TrainSpec) -> list[str]:
    """LoRA's named target modules against the model's own (built on the meta device:
    imports transformers and torch, only for specs that name modules)."""
    from transformers import AutoConfig

    from raygen.jobs.models.lora import unknown_targets

    model = spec.model
    if model.pretrained and is_remote(model.pretrained):
        return []  # checked where the model is downloaded
    config = (
        AutoConfig.from_pretrained(model.pretrained)
        if model.pretrained
        else AutoConfig.for_model(model.arch, **model.config)
    )
    unknown, linear = unknown_targets(config, list(model.lora.target_modules))
    if not unknown:
        return []
    return [
        f"`model.lora.target_modules`: {', '.join(unknown)} matches no module of this "
        f"{config.model_type} model; its linear layers are {', '.join(linear)} (or use "
        "all-linear)."
    ]


def _chat_problems(spec: TrainSpec) -> list[str]:
    """format chat: conversations, a chat template, and the loss on the right tokens."""
    problems = []
    d, tokenizer = spec.data, spec.tokenizer
    builtin = [e for e in d.train + (d.eval or []) if e.startswith(BUILTIN_PREFIX)]
    if builtin:
        problems.append(
            f"`data.train`: {', '.join(builtin)} is plain text; format chat reads conversations "
            "from Parquet, JSON Lines or Hugging Face data sets."
        )
    template = tokenizer.chat_template
    if template is not None and template not in BUILTIN_TEMPLATES and "{" not in template:
        problems.append(
            f"`tokenizer.chat_template`: {template!r} is neither a built-in "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template."
        )
    source = tokenizer.path or spec.model.pretrained
    if template is None and not (source and not tokenizer.train and _has_template(source)):
        whose = (
            f"the tokenizer in {source}"
            if source and not tokenizer.train
            else ("a tokenizer trained here")
        )
        problems.append(
            f"`tokenizer.chat_template`: {whose} has no chat template; set "
            "tokenizer.chat_template: chatml (the built-in) or a Jinja template."
        )
    return problems


def _has_template(tokenizer_dir: str) -> bool:
    """Whether a saved tokenizer carries a chat template (in its config, or the
    chat_template.jinja file newer transformers write beside it)."""
    if exists(join(tokenizer_dir, "chat_template.jinja")):
        return True
    config = read_text(join(tokenizer_dir, "tokenizer_config.json"))
    try:
        return bool(config and json.loads(config).get("chat_template"))
    except ValueError:
        return False


def _image_problems(spec: TrainSpec) -> list[str]:
    """A spec of an image family (diffusion, vae, gan): its data, its network's config."""
    problems = []
    d, sampling, family = spec.data, spec.sampling, spec.model.family
    kind = {"vae": "a VAE", "gan": "a GAN"}.get(family, "a diffusion model")
    missing_files = pretrained_problems(spec.model)  # storage reads: once
    problems += missing_files
    if spec.train.group_weighting:
        audit = (
            ""
            if family == "vae"
            else f", or audit the {family} model's classes with class_accuracy"
        )
        problems.append(
            "`train.group_weighting`: group weighting is for language models (per-token "
            f"losses); remove it{audit}."
        )
    tokenizer = spec.tokenizer
    if tokenizer.path or tokenizer.train or tokenizer.chat_template:
        kinds = {"vae": "VAEs", "gan": "GANs"}.get(family, "diffusion models")
        problems.append(f"`tokenizer`: {kinds} have no tokenizer; remove the section.")
    if spec.model.lora:
        problems.append(f"`model.lora`: LoRA adapts causal language models; remove it for {kind}.")
    if d.format == "chat" or spec.train.loss_on:
        problems.append(
            "`data.format`/`train.loss_on`: conversations and their loss are for language "
            f"models; {kind} trains on images (remove them)."
        )
    text_sets = [e for e in d.train + (d.eval or []) if e.startswith(BUILTIN_PREFIX)]
    text_sets = [e for e in text_sets if e != BUILTIN_DIGITS]
    if text_sets:
        problems.append(
            f"`data.train`: {', '.join(text_sets)} is text; {kind} trains on images "
            f"(Parquet with an image column, or {BUILTIN_DIGITS})."
        )
    if d.dedupe == "near":
        problems.append(
            "`data.dedupe`: near-duplicate detection is for text; images are deduplicated by "
            "their pixels with dedupe: exact."
        )
    labelled = BUILTIN_DIGITS in d.train or d.label_column is not None
    if BUILTIN_DIGITS in d.train and len(d.train) > 1 and d.label_column is None:
        problems.append(
            f"`data.label_column`: mixing {BUILTIN_DIGITS} with Parquet inputs needs their "
            "label column too; set data.label_column."
        )
    if family != "diffusion" and spec.model.scheduler is not None:
        problems.append("`model.scheduler`: only diffusion models have a scheduler; remove it.")
    if family == "vae":
        problems += _vae_problems(spec, bool(missing_files))
    elif family == "gan":
        problems += _gan_spec_problems(spec, labelled)
    elif spec.model.arch in DIT_ARCHS:
        problems += _dit_spec_problems(spec, labelled)
    else:
        problems += _unet_spec_problems(spec, bool(missing_files), labelled)
    if sampling.guidance_scale is not None and spec.model.arch not in DIT_ARCHS:
        problems.append(
            "`sampling.guidance_scale`: classifier-free guidance is for latent diffusion "
            "(arch: dit), whose transformer learns a 'no class' prediction; remove it."
        )
    if sampling.fid_extractor == "classifier" and not labelled:
        problems.append(
            "`sampling.fid_extractor`: the classifier is trained on labelled images; set "
            "data.label_column, or use inception (with inception_weights) or none."
        )
    if sampling.fid_extractor == "inception":
        if not sampling.inception_weights:
            problems.append(
                "`sampling.inception_weights`: fid_extractor inception needs the path of a "
                "TorchScript Inception file (raygen never downloads weights); or use "
                "fid_extractor: classifier or none."
            )
        elif not exists(sampling.inception_weights):
            problems.append(
                f"`sampling.inception_weights`: {sampling.inception_weights} does not exist."
            )
    if sampling.fid_samples == 1:
        problems.append("`sampling.fid_samples`: an FID needs at least 2 samples (or 0: off).")
    for key, entries in (("data.train", d.train), ("data.eval", d.eval or [])):
        try:
            check_image_columns(list_input_files(entries, key, None), spec, key)
        except SpecError as exc:
            problems += exc.problems
    return problems


def _unet_spec_problems(spec: TrainSpec, missing_files: bool, labelled: bool) -> list[str]:
    problems = []
    if spec.model.arch not in (None, "unet2d") and not spec.model.pretrained:
        problems.append(
            f"`model.arch`: {spec.model.arch!r} is not a diffusion architecture; use unet2d "
            "(on pixels) or dit (on a VAE's latents)."
        )
    elif (spec.model.arch or spec.model.pretrained) and not missing_files:
        config = unet_config(spec.model)
        model_problems = unet_problems(
            config, bool(spec.model.pretrained), spec.data.label_column is not None
        )
        problems += model_problems
        if not model_problems and num_classes(config) and not labelled:
            problems.append(
                "`data.label_column`: the UNet is class-conditional (num_class_embeds), but "
                "the data has no labels; set data.label_column (or remove num_class_embeds)."
            )
    return problems


def _dit_spec_problems(spec: TrainSpec, labelled: bool) -> list[str]:
    """A latent diffusion spec: its VAE, and its DiT's config on that VAE's latents."""
    from raygen.jobs.dit_facts import dit_problems

    problems = latent_vae_problems(spec.model)
    if not problems:
        problems += dit_problems(spec.model.config, latent_shape_of(spec.model))
    if not labelled:
        problems.append(
            "`data.label_column`: a DiT is class-conditional (diffusers' DiT takes a class "
            "label with every image); set data.label_column, or train an unconditional UNet "
            "(arch: unet2d)."
        )
    if spec.data.random_flip:
        problems.append(
            "`data.random_flip`: a DiT trains on latents encoded once when the data is "
            "prepared, and a flipped latent is not the latent of the flipped image; remove it."
        )
    return problems


def _gan_spec_problems(spec: TrainSpec, labelled: bool) -> list[str]:
    problems = []
    model = spec.model
    if model.pretrained:
        problems.append(
            "`model.pretrained`: a GAN is trained from `arch: dcgan` (fine-tuning a saved GAN "
            "is not supported); set model.arch and model.config instead."
        )
    elif model.arch not in GAN_ARCHS:
        problems.append(
            f"`model.arch`: {model.arch!r} is not a GAN architecture; use {' or '.join(GAN_ARCHS)}."
        )
    else:
        from raygen.jobs.gan_facts import gan_problems, num_classes

        found = gan_problems(model.config, spec.data.label_column is not None)
        problems += found
        if not found and num_classes(model.config) and not labelled:
            problems.append(
                "`data.label_column`: the GAN is class-conditional (num_classes), but the data "
                "has no labels; set data.label_column (or remove num_classes)."
            )
    if spec.deepspeed.zero_stage == 3:
        problems.append(
            "`deepspeed.zero_stage`: a GAN trains with ZeRO stages 0-2: in the generator's turn "
            "the discriminator scores its images outside the discriminator's engine, which "
            "ZeRO-3's partitioned weights do not allow; set zero_stage: 2 (each network's "
            "optimizer state and gradients are still partitioned)."
        )
    if spec.train.grad_accum != 1:
        problems.append(
            "`train.grad_accum`: a GAN's two networks take turns micro-batch by micro-batch; "
            "set grad_accum: 1 (train.d_steps_per_g gives the discriminator more updates)."
        )
    return problems


def _vae_problems(spec: TrainSpec, missing_files: bool) -> list[str]:
    problems = []
    model = spec.model
    if model.ema is not None:
        problems.append(
            "`model.ema`: a VAE keeps no average of its weights (diffusion models and GANs "
            "do); remove it."
        )
    if model.arch not in (None, *VAE_ARCHS) and not model.pretrained:
        problems.append(
            f"`model.arch`: {model.arch!r} is not a VAE architecture; use {' or '.join(VAE_ARCHS)}."
        )
    elif not missing_files:
        problems += vae_problems(image_model_config(model), bool(model.pretrained))
    if spec.data.label_column:
        problems.append(
            "`data.label_column`: a VAE is unconditional and ignores labels; remove it (labels "
            "matter to the diffusion model trained on its latents)."
        )
    return problems


def validate_train_spec(spec: TrainSpec, source: str) -> TrainSpec:
    """Resolve paths and raise one SpecError listing every problem found without Ray."""
    spec = resolve_paths(spec)
    problems = spec_problems(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def _lm_config_problems(model: ModelSpec) -> list[str]:
    """`model.arch` and `model.config` against transformers' config classes. A spec whose
    keys all passed before (with this transformers version) is answered from raygen's cache,
    without importing transformers."""
    fact = f"causal-lm {model.arch} accepts"
    accepted = recall("transformers", fact)
    if accepted is not None and set(model.config) <= set(accepted):
        return []
    from raygen.jobs.models.lm_config import config_class_problems, config_keys

    problems = config_class_problems(model)
    if not problems:  # legacy aliases (e.g. Llama's rope_theta) passed too: remember them
        remember(
            "transformers",
            fact,
            sorted(set(accepted or ()) | config_keys(model.arch) | set(model.config)),
        )
    return problems
