"""Export any training checkpoint of a run as a `model/` directory, like the end of training.

The DeepSpeed shards of every rank are consolidated on the CPU (no workers needed), so a
sweep's best checkpoint, or any checkpoint a run kept, becomes a model that plain
transformers/diffusers (and raygen's serving) load.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml

from raygen.cluster.publish import check_ours, publish_dir
from raygen.cluster.storage import join, local_copy, read_text
from raygen.jobs.data.chat import set_generation_ends
from raygen.jobs.errors import SpecError
from raygen.jobs.run_dir import MODEL_KIND
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.checkpoint import data_only_loads

logger = logging.getLogger(__name__)


def last_checkpoint(run_dir: str) -> str:
    """The checkpoint a finished run ended with (its result.json says which).

    Raises:
        SpecError: the run has not finished one; `--checkpoint` names another.
    """
    from raygen.jobs.run_dir import read_result

    result = read_result(run_dir) or {}
    checkpoint = (result.get("paths") or {}).get("checkpoint")
    if not checkpoint:
        raise SpecError(
            "export",
            f"{run_dir} has no finished checkpoint (no result.json naming one); give "
            "--checkpoint with one of its checkpoint_<step> directories.",
        )
    return checkpoint


def export_checkpoint(run_dir: str, checkpoint: str, out_dir: str) -> str:
    """Write the weights of `checkpoint` (of the run in `run_dir`) as a model dir `out_dir`.

    Diffusion runs with an EMA export the EMA weights, as training does. `out_dir` is
    replaced whole, and only if raygen wrote what is there. Checkpoint files are read as
    data only (`torch.load(weights_only=True)`): a checkpoint cannot run code here.
    Returns `out_dir`.

    Raises:
        SpecError: the run or checkpoint is missing or unreadable.
        NotOurs: `out_dir` holds files raygen did not write.
    """
    check_ours(out_dir.rstrip("/"), "--out")  # before the work, not after it
    text = read_text(join(run_dir, "spec.yaml"))
    if text is None:
        raise SpecError("export", f"{run_dir} has no spec.yaml; give a raygen run directory.")
    spec = TrainSpec.model_validate(yaml.safe_load(text))
    local = Path(local_copy(checkpoint))
    # A GAN's checkpoint holds one DeepSpeed checkpoint per network; the generator's exports.
    engine_dir = local / "generator" if spec.model.family == "gan" else local
    tag_file = engine_dir / "latest"
    if not tag_file.is_file():
        raise SpecError(
            "export", f"{checkpoint} is not a raygen training checkpoint (no `latest`)."
        )
    tag = tag_file.read_text().strip()
    try:
        weights = _consolidated_weights(engine_dir, tag, spec.deepspeed.zero_stage)
    except pickle.UnpicklingError as exc:
        raise SpecError(
            "export",
            f"{checkpoint} holds objects that are not plain data ({str(exc).splitlines()[0]}); "
            "raygen reads checkpoints as data only, so a file cannot run code here. Export a "
            "checkpoint raygen wrote.",
        ) from None
    if spec.model.pretrained:
        model = spec.model.model_copy(update={"pretrained": local_copy(spec.model.pretrained)})
        spec = spec.model_copy(update={"model": model})

    if spec.model.family == "diffusion":
        write = _diffusion_writer(spec, weights, local, run_dir)
    elif spec.model.family == "vae":
        write = _vae_writer(spec, weights, local, tag)
    elif spec.model.family == "gan":
        write = _generator_writer(spec, weights, local)
    else:
        write = _language_model_writer(spec, weights, run_dir)
    publish_dir(out_dir.rstrip("/"), MODEL_KIND, write, key="--out")
    return out_dir


def _consolidated_weights(local: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights from every rank's shard of a DeepSpeed checkpoint."""
    with data_only_loads():
        if zero_stage == 0:
            states = torch.load(local / tag / "mp_rank_00_model_states.pt", weights_only=True)
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(local), tag=tag)


def _language_model_writer(spec: TrainSpec, weights: dict, run_dir: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raygen.jobs.models.causal_lm import build_config

    prepared = spec.data.prepared or join(run_dir, "data")
    tokenizer = AutoTokenizer.from_pretrained(local_copy(join(prepared, "tokenizer")))
    config = build_config(spec.model, len(tokenizer), spec.data.seq_len, tokenizer.eos_token_id)
    if spec.model.lora:
        return _lora_writer(spec, weights, config, tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise SpecError(
            "export", f"the checkpoint does not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})."
        )  # fmt: skip
    model.tie_weights()
    set_generation_ends(model, tokenizer)

    def write(out: str) -> None:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return write


def _lora_writer(spec: TrainSpec, weights: dict, config: Any, tokenizer: Any) -> Any:
    """A LoRA run's checkpoint holds what trained (adapters, new token rows): the frozen
    weights are rebuilt as the run built them (seeded alike), and the merged model written,
    with the PEFT adapter in `adapter/` inside it."""
    from raygen.jobs.models.causal_lm import build_trainable_lm
    from raygen.jobs.models.lora import adapter_writer, base_vocab_size
    from raygen.jobs.run_dir import ADAPTER_DIR
    from raygen.jobs.train.worker import seed_everything, trains_new_token_rows

    seed_everything(spec.train.seed)  # as the workers are seeded before they build it
    model = build_trainable_lm(spec.model, config, len(tokenizer), trains_new_token_rows(spec))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or trained & set(missing):
        raise SpecError(
            "export", f"the checkpoint does not match the model's adapters (missing "
            f"{sorted(trained & set(missing))[:3]}, unexpected {unexpected[:3]})."
        )  # fmt: skip
    model.eval()
    set_generation_ends(model, tokenizer)
    write_adapter = adapter_writer(model, tokenizer, base_vocab_size(spec.model.pretrained))

    def write(out: str) -> None:
        write_adapter(str(Path(out) / ADAPTER_DIR))  # before merging takes the adapters out
        model.merge_and_unload().save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return write


def _diffusion_writer(spec: TrainSpec, weights: dict, local: Path, run_dir: str) -> Any:
    """The UNet's pipeline, or a DiT's with its VAE and the prepared data's classes; the
    EMA of the weights when the run kept one."""
    from diffusers import AutoencoderKL, UNet2DModel

    from raygen.jobs.models.diffusion import build_pipeline
    from raygen.jobs.pretrained import unet_config
    from raygen.jobs.spec import NoiseSchedulerSpec

    vae, classes = None, 0
    if spec.model.vae is None:
        net = UNet2DModel(**unet_config(spec.model))
    else:
        from raygen.jobs.data.prepare import data_fingerprint, read_stats
        from raygen.jobs.dit_facts import dit_config
        from raygen.jobs.models.dit import build_dit
        from raygen.jobs.pretrained import latent_vae_dir, latent_vae_problems

        problems = latent_vae_problems(spec.model)
        if problems:
            raise SpecError("export", problems)
        # The DiT goes with the VAE and classes it was trained on: the prepared data's,
        # whose fingerprint covers the VAE's files.
        prepared = spec.data.prepared or join(run_dir, "data")
        stats = read_stats(prepared) or {}
        if "latent_shape" not in stats or stats.get("fingerprint") != data_fingerprint(spec):
            raise SpecError(
                "export",
                f"the run's prepared latents ({prepared}) are gone, or the data or the VAE at "
                f"{spec.model.vae} changed since: the export would pair the DiT with latents "
                "it was not trained on. Restore them, or export the model/ the run wrote.",
            )
        net = build_dit(dit_config(spec.model.config, tuple(stats["latent_shape"])))
        vae = AutoencoderKL.from_pretrained(local_copy(latent_vae_dir(spec.model)))
        classes = stats["num_classes"]
    ema = _ema_weights(local, [name for name, _ in net.named_parameters()], net)
    net.load_state_dict({**weights, **ema})
    pipeline = build_pipeline(net, spec.model.scheduler or NoiseSchedulerSpec(), vae, classes)
    return lambda out: pipeline.save_pretrained(out)


def _generator_writer(spec: TrainSpec, weights: dict, local: Path) -> Any:
    """The GAN's generator, with the EMA of its weights when the run kept one."""
    from raygen.jobs.gan_facts import DCGAN_DEFAULTS
    from raygen.jobs.models.dcgan import Generator
    from raygen.jobs.train.gan import generator_writer

    kwargs = {**DCGAN_DEFAULTS, **spec.model.config}
    generator = Generator(**kwargs)
    ema = _ema_weights(local, [name for name, _ in generator.named_parameters()], generator)
    return generator_writer(kwargs, {**weights, **ema})


def _vae_writer(spec: TrainSpec, weights: dict, local: Path, tag: str) -> Any:
    """The VAE, with the latents' standard deviation the run measured at this checkpoint
    (its client state) as the inverse of its scaling factor."""
    from raygen.jobs.pretrained import image_model_config
    from raygen.jobs.train.vae import LATENT_STD, vae_writer

    # Rank 0's model states hold the client state: `mp_rank_00_model_states.pt`, or under
    # ZeRO-3 `zero_pp_rank_0_mp_rank_00_model_states.pt`.
    (states_file,) = [
        p for p in sorted((local / tag).glob("*mp_rank_00_model_states.pt"))
        if p.name.startswith(("mp_rank", "zero_pp_rank_0_"))
    ]  # fmt: skip
    with data_only_loads():
        states = torch.load(states_file, weights_only=True)
    return vae_writer(image_model_config(spec.model), weights, states.get(LATENT_STD))


def _ema_weights(local: Path, names: list[str], unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA of the weights from the ranks' states (partitions under ZeRO-3), or {}."""
    files = sorted((local / "rank_state").glob("rank_*.pt"))
    if not files:
        return {}
    shards = [torch.load(f, map_location="cpu", weights_only=True)["ema"]["shadow"] for f in files]
    params = dict(unet.named_parameters())
    out = {}
    for i, name in enumerate(names):
        shape = params[name].shape
        first = shards[0][i]
        if first.shape == shape:  # ZeRO 0-2: every rank holds the whole average
            out[name] = first
        else:  # ZeRO-3: rank r holds the r-th slice of the flattened parameter
            flat = torch.cat([shard[i] for shard in shards])
            out[name] = flat[: params[name].numel()].view(shape)
    return out
