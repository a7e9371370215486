"""The VAE training loop that runs on every Ray Train worker."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from raygen.cluster.publish import publish_dir
from raygen.cluster.storage import join
from raygen.jobs.data.pixels import batch_to_tensors
from raygen.jobs.models.diffusion import seeded_noise, to_uint8
from raygen.jobs.models.vae import VaeObjective, build_vae, decode_latents
from raygen.jobs.pretrained import component_dir, image_model_config
from raygen.jobs.run_dir import MODEL_DIR, MODEL_KIND
from raygen.jobs.sampling import image_grid
from raygen.jobs.train import metrics as m
from raygen.jobs.train.checkpoint import save_and_report
from raygen.jobs.train.deepspeed_config import derive_deepspeed_config
from raygen.jobs.train.worker import (
    PreemptionWatch,
    TrainWindow,
    build_optimizer,
    checkpoint_cadence,
    compute_dtype,
    lr_lambda,
    micro_batches,
    resume,
    start_worker,
)
from raygen.jobs.vae_facts import latent_shape

logger = logging.getLogger(__name__)

LATENT_STD = "latent_std"  # in a checkpoint's client state: the latents' measured std
_PAIRS = 16  # originals shown beside their reconstructions at each evaluation


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train the spec's AutoencoderKL with DeepSpeed on this worker; rank 0 logs and exports."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    spec, rank, world = start_worker(config)
    run_dir, prepared = config["run_dir"], config["prepared"]
    shape = tuple(prepared["image_shape"])  # (C, H, W)
    latents_shape = latent_shape(image_model_config(spec.model))
    kl_weight = spec.model.kl_weight

    pretrained = spec.model.pretrained
    vae = build_vae(spec.model, component_dir(pretrained, "vae") if pretrained else None)
    objective = VaeObjective(vae, spec.model.reconstruction_loss)
    ds_config = derive_deepspeed_config(spec, world, max(p.numel() for p in vae.parameters()))
    engine, _, _, scheduler = deepspeed.initialize(
        model=objective,
        optimizer=build_optimizer(spec, objective),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec)),
        config=ds_config,
    )
    device = engine.device
    dtype = compute_dtype(spec)
    start_step, client_state, _, log = resume(engine, [scheduler], spec, config, rank)
    latents = LatentMoments(device, client_state.get(LATENT_STD))

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    micro_per_epoch = prepared["train_examples"] // world // spec.train.micro_batch_size
    batches = micro_batches(spec, train_shard, micro_per_epoch, start_step * spec.train.grad_accum)
    eval_batches = min(
        spec.train.eval_batches,
        prepared["eval_examples"] // spec.train.micro_batch_size // world,
    )

    grid_n = spec.sampling.grid_images

    def to_images(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images, _ = batch_to_tensors(batch, shape)
        return images.to(device, dtype)  # (B, C, H, W) in [-1, 1]

    def evaluate() -> dict[str, Any]:
        """Reconstruction error, PSNR and KL on the eval images (posterior means, so the
        figures are deterministic), the mean image's PSNR beside them (the trivial baseline
        any VAE must beat), and rank 0's grids."""
        engine.eval()
        # (reconstruction loss, KL, squared error in [0, 1] units) summed over batches, batches
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        # per-pixel sums of the images and their squares in [0, 1] units, and their count
        moments = torch.zeros(2, *shape, dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        pairs = None
        with torch.no_grad():
            eval_iter = eval_shard.iter_torch_batches(
                batch_size=spec.train.micro_batch_size, drop_last=True
            )
            for i, batch in enumerate(eval_iter):
                if i >= eval_batches * world:
                    break
                if i % world != rank:
                    continue
                images = to_images(batch)
                loss, kl, _, decoded = engine(images, sample=False)
                unit = (images.double() + 1) / 2
                error = ((decoded.double().clamp(-1, 1) + 1) / 2 - unit).square().mean()
                totals += torch.stack([loss.double(), kl.double(), error, torch.ones_like(error)])
                moments += torch.stack([unit.sum(0), unit.square().sum(0)])
                count += len(images)
                if pairs is None:
                    pairs = (images[:_PAIRS].float().cpu(), decoded[:_PAIRS].float().cpu())
            for tensor in (totals, moments, count):
                dist.all_reduce(tensor)
            # Every rank decodes (ZeRO-3 gathers the decoder's weights from all of them).
            noise, _ = seeded_noise(latents_shape, spec.train.seed, list(range(grid_n)))
            samples = decode_latents(engine.module.vae, noise.to(device))
        engine.train()
        loss, kl, error, n = totals.tolist()
        mean = moments[0] / count
        baseline = (moments[1] / count - mean.square()).mean().item()  # the mean image's MSE
        row: dict[str, Any] = {
            m.EVAL_LOSS: (loss + kl_weight * kl) / n,
            m.RECONSTRUCTION_ERROR: loss / n,
            m.KL: kl / n,
            m.PSNR: psnr(error / n),
            m.MEAN_IMAGE_PSNR: psnr(baseline),
        }
        if rank == 0:
            row["reconstructions"] = reconstruction_grid(*pairs)
            row["samples"] = image_grid(to_uint8(samples), min(8, grid_n))
        return row

    engine.train()
    last_metrics: dict[str, Any] = {}

    def save(step: int, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint every rank's shard (and report it to Ray Train) at `step`, with the
        latents' standard deviation over the steps since the last checkpoint."""
        std = latents.measure()  # a collective: every rank saves at the same steps
        numeric = {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))}
        state = {"step": step, LATENT_STD: std}
        save_and_report(engine, step, {**numeric, LATENT_STD: std, **(extra or {})}, state)
        if log:
            log.sync()

    step = start_step
    watch = PreemptionWatch(device)
    window = TrainWindow(spec, world, device)
    while step < spec.train.max_steps:
        for _ in range(spec.train.grad_accum):
            images = to_images(next(batches))
            if spec.data.random_flip:
                flip = torch.rand(len(images), device=device) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            reconstruction, kl, sampled, _ = engine(images)
            loss = reconstruction + kl_weight * kl
            engine.backward(loss)
            engine.step()  # DeepSpeed only updates at the accumulation boundary
            window.add(loss)
            latents.add(sampled.detach())
        step += 1

        is_last = step == spec.train.max_steps
        row = window.end_step(step, scheduler.get_last_lr()[0], is_last)
        if step % spec.train.eval_every == 0 or is_last:
            evaluated = evaluate()
            reconstructions = evaluated.pop("reconstructions", None)
            samples = evaluated.pop("samples", None)
            if log:
                log.log_image(step, reconstructions, tag="reconstructions")
                log.log_image(step, samples)
            row = {m.STEP: step, **row, **evaluated}
        if row and log:
            log.log(row)
        last_metrics.update(row)
        if row:
            window.reset()
        if checkpoint_cadence(step, is_last, spec, save, watch, run_dir, rank, config.get("gate")):
            window.restart_clock()  # checkpoint time is not step time

    export_vae(engine, latents.std, run_dir, rank, spec.deepspeed.zero_stage)
    if log:
        log.close()


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error of [0, 1] pixels."""
    return 10 * math.log10(1 / max(mse, 1e-12))


def reconstruction_grid(originals: torch.Tensor, decoded: torch.Tensor) -> np.ndarray:
    """Rows of 8 originals, each followed by the row of their reconstructions."""
    rows = []
    for start in range(0, len(originals), 8):
        rows += [originals[start : start + 8], decoded[start : start + 8]]
    return image_grid(to_uint8(torch.cat(rows)), min(8, len(originals)))


class LatentMoments:
    """The sampled training latents' first two moments, summed on the device since the
    last measurement: their standard deviation is what a latent diffusion model divides
    latents by (the export's `scaling_factor` is its inverse)."""

    def __init__(self, device: Any, std: float | None):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum, sum of squares
        self.std = std  # the last measurement (a resumed run's, from its checkpoint)

    def add(self, latents: torch.Tensor) -> None:
        z = latents.double()
        n = torch.full((), z.numel(), dtype=torch.float64, device=z.device)
        self.sums += torch.stack([n, z.sum(), z.square().sum()])

    def measure(self) -> float | None:
        """All ranks' latents since the last call (a collective); the previous value when
        there were none (a checkpoint right after resuming)."""
        import torch.distributed as dist

        dist.all_reduce(self.sums)
        count, total, squares = self.sums.tolist()
        self.sums.zero_()
        if count:
            mean = total / count
            self.std = math.sqrt(max(squares / count - mean * mean, 1e-12))
        return self.std


def export_vae(engine: Any, std: float | None, run_dir: str, rank: int, zero_stage: int) -> None:
    """Save the VAE in `<run>/model` as `AutoencoderKL.from_pretrained(dir)` loads it, its
    `scaling_factor` set to 1 / the latents' measured standard deviation. All ranks must call
    this: with ZeRO-3 the weights are gathered from every partition."""
    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank != 0:
        return
    write = vae_writer(engine.module.vae.config, state_dict, std)
    publish_dir(join(run_dir, MODEL_DIR), MODEL_KIND, write, key="run.storage")


def vae_writer(config: Any, objective_state: dict[str, torch.Tensor], std: float | None) -> Any:
    """A writer of the AutoencoderKL built from `config` (its config, or keyword arguments)
    whose weights are `objective_state` (a VaeObjective's state dict: keys under `vae.`)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(config)
    prefix = "vae."
    weights = {k[len(prefix) :]: v.float().cpu() for k, v in objective_state.items()}
    vae.load_state_dict(weights)
    if std:
        vae.register_to_config(scaling_factor=1 / std)
    return lambda out: vae.save_pretrained(out)
