"""Everything wrong with a train spec that can be found before Ray is asked for anything,
one line per problem (key path, what is wrong, how to fix it). Imports no torch and no Ray:
`raygen train --check` and `raygen submit` start fast; a model family's own checks
import its library (transformers, diffusers) only when asked."""

from __future__ import annotations

from pathlib import Path

from raygen.cluster.storage import exists, join
from raygen.jobs.data.images import check_image_columns
from raygen.jobs.data.inputs import check_columns, list_input_files
from raygen.jobs.errors import SpecError
from raygen.jobs.library_facts import recall, remember
from raygen.jobs.pretrained import pretrained_problems, unet_config
from raygen.jobs.spec import BUILTIN_IMAGES, BUILTIN_PREFIX, ModelSpec, TrainSpec
from raygen.jobs.train.deepspeed_config import deepspeed_config_problems
from raygen.jobs.unet_facts import num_classes, unet_problems

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
    data["tokenizer"]["path"] = absolute(spec.tokenizer.path)
    data["run"]["storage"] = absolute(spec.run.storage)
    data["sampling"]["inception_weights"] = absolute(spec.sampling.inception_weights)
    return TrainSpec.model_validate(data)


def spec_problems(spec: TrainSpec) -> list[str]:
    """Everything wrong with a spec that can be found without Ray: one line per problem."""
    problems = _common_problems(spec)
    if spec.model.family == "diffusion":
        return problems + _diffusion_problems(spec)
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
    d = spec.data
    columns = {d.text_column: "data.text_column"}
    weighting = spec.train.group_weighting
    if weighting:
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


def _diffusion_problems(spec: TrainSpec) -> list[str]:
    problems = []
    d, sampling = spec.data, spec.sampling
    missing_files = pretrained_problems(spec.model)  # storage reads: once
    problems += missing_files
    if spec.train.group_weighting:
        problems.append(
            "`train.group_weighting`: group weighting is for language models (per-token "
            "losses); remove it, or audit the diffusion model's classes with class_accuracy."
        )
    tokenizer = spec.tokenizer
    if tokenizer.path or tokenizer.train:
        problems.append("`tokenizer`: diffusion models have no tokenizer; remove the section.")
    text_sets = [e for e in d.train + (d.eval or []) if e.startswith(BUILTIN_PREFIX)]
    text_sets = [e for e in text_sets if e != BUILTIN_DIGITS]
    if text_sets:
        problems.append(
            f"`data.train`: {', '.join(text_sets)} is text; a diffusion model trains on images "
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
    if spec.model.arch not in (None, "unet2d") and not spec.model.pretrained:
        problems.append(
            f"`model.arch`: {spec.model.arch!r} is not a diffusion architecture; use unet2d."
        )
    elif (spec.model.arch or spec.model.pretrained) and not missing_files:
        config = unet_config(spec.model)
        model_problems = unet_problems(
            config, bool(spec.model.pretrained), d.label_column is not None
        )
        problems += model_problems
        if not model_problems and num_classes(config) and not labelled:
            problems.append(
                "`data.label_column`: the UNet is class-conditional (num_class_embeds), but "
                "the data has no labels; set data.label_column (or remove num_class_embeds)."
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
