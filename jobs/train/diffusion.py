"""The diffusion training loop that runs on every Ray Train worker: a UNet on pixels, or a
DiT on the latents of a frozen VAE (latent diffusion), which decodes its samples."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from raygen.cluster.publish import publish_dir
from raygen.cluster.storage import join, local_copy
from raygen.jobs.data.latents import batch_to_latents
from raygen.jobs.data.pixels import batch_to_tensors
from raygen.jobs.dit_facts import DEFAULT_GUIDANCE, NULL_CLASS, dit_config
from raygen.jobs.models.diffusion import (
    build_noise_scheduler,
    build_pipeline,
    build_unet,
    diffusion_loss,
    generate,
    seeded_noise,
    to_uint8,
)
from raygen.jobs.pretrained import latent_vae_dir, unet_config, unet_dir
from raygen.jobs.run_dir import MODEL_DIR, MODEL_KIND
from raygen.jobs.sampling import image_grid
from raygen.jobs.spec import NoiseSchedulerSpec
from raygen.jobs.train import metrics as m
from raygen.jobs.train.checkpoint import save_and_report
from raygen.jobs.train.deepspeed_config import derive_deepspeed_config
from raygen.jobs.train.ema import WeightAverage
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
from raygen.jobs.unet_facts import num_classes

logger = logging.getLogger(__name__)

_GENERATE_BATCH = 64  # images denoised per forward when sampling


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train the spec's UNet or DiT with DeepSpeed on this worker; rank 0 logs, samples and
    exports."""
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from diffusers import AutoencoderKL, DDIMScheduler

    spec, rank, world = start_worker(config)
    run_dir, prepared = config["run_dir"], config["prepared"]
    latent = spec.model.vae is not None
    scheduler_spec = spec.model.scheduler or NoiseSchedulerSpec()
    noise_scheduler = build_noise_scheduler(scheduler_spec, latent)
    # What the network denoises: images (C, H, W), or a DiT's latents (C, h, w).
    shape = tuple(prepared["latent_shape" if latent else "image_shape"])
    # A DiT is class-conditional, on the data's classes; a UNet on its class embeddings.
    classes = prepared["num_classes"] if latent else num_classes(unet_config(spec.model))
    conditional = classes > 0
    guidance = (spec.sampling.guidance_scale or DEFAULT_GUIDANCE) if latent else 1.0
    grid_n = _grid_size(spec.sampling.grid_images, classes)
    # Every rank must agree on how many images to sample (rank 0 alone computes the FID).
    # FID when the prepared data has a reference and the spec asks for samples (prepared data
    # is shared: a run with fid_samples: 0 may reuse data prepared with a reference).
    with_fid = bool(prepared.get("fid")) and spec.sampling.fid_samples > 0
    n_samples = max(grid_n, spec.sampling.fid_samples if with_fid else 0)

    pretrained = spec.model.pretrained
    if latent:
        from raygen.jobs.models.dit import build_dit, decode_scaled

        unet = build_dit(dit_config(spec.model.config, shape))
    else:
        unet = build_unet(spec.model, unet_dir(pretrained) if pretrained else None)
    ds_config = derive_deepspeed_config(spec, world, max(p.numel() for p in unet.parameters()))
    engine, _, _, scheduler = deepspeed.initialize(
        model=unet,
        optimizer=build_optimizer(spec, unet),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec)),
        config=ds_config,
    )
    device = engine.device
    dtype = compute_dtype(spec)
    vae = None
    if latent:  # frozen, outside DeepSpeed: it decodes samples and is exported as it is
        vae = AutoencoderKL.from_pretrained(local_copy(latent_vae_dir(spec.model)))
        vae = vae.eval().requires_grad_(False).to(device)
    ema = WeightAverage(engine.module, spec.model.ema.decay) if spec.model.ema else None
    start_step, _, rank_state, log = resume(engine, [scheduler], spec, config, rank)
    if ema and rank_state:
        ema.load_state_dict(rank_state["ema"])

    fid = None
    if rank == 0 and with_fid:
        from raygen.jobs.eval.fid import SampleFid

        fid = SampleFid(
            prepared["dir"], prepared["fid"]["extractor"], spec.sampling.inception_weights
        )

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    micro_per_epoch = prepared["train_examples"] // world // spec.train.micro_batch_size
    batches = micro_batches(spec, train_shard, micro_per_epoch, start_step * spec.train.grad_accum)
    eval_batches = min(
        spec.train.eval_batches,
        prepared["eval_examples"] // spec.train.micro_batch_size // world,
    )
    T = scheduler_spec.num_train_timesteps

    def to_inputs(
        batch: dict[str, torch.Tensor], training: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images in [-1, 1] or scaled latents (B, *shape), labels (B,) or None). Training
        latents are fresh draws from each image's posterior, a tenth of their labels
        dropped to "no class"; evaluation takes the posterior means and every label."""
        if not latent:
            images, labels = batch_to_tensors(batch, shape)
            return images.to(device, dtype), labels.to(device) if conditional else None
        from raygen.jobs.models.dit import drop_labels, sample_latents

        mean, std, labels = batch_to_latents(batch, shape)
        noise = torch.randn_like(mean) if training else None
        latents = sample_latents(mean, std, vae.config.scaling_factor, noise)
        labels = drop_labels(labels) if training else labels
        return latents.to(device, dtype), labels.to(device)

    def evaluate() -> dict[str, float]:
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, batches)
        with torch.no_grad(), ema.swapped_in() if ema else contextlib.nullcontext():
            # The same noise and timesteps at every evaluation: losses are comparable.
            eval_iter = eval_shard.iter_torch_batches(
                batch_size=spec.train.micro_batch_size, drop_last=True
            )
            for i, batch in enumerate(eval_iter):
                if i >= eval_batches * world:
                    break
                if i % world != rank:
                    continue
                images, labels = to_inputs(batch, training=False)
                generator = torch.Generator().manual_seed(spec.train.seed + i)
                noise = torch.randn(images.shape, generator=generator).to(device, dtype)
                t = torch.randint(0, T, (len(images),), generator=generator).to(device)
                loss = diffusion_loss(engine, noise_scheduler, images, labels, noise, t)
                total[0] += loss.double()
                total[1] += 1
            dist.all_reduce(total)
            samples = sample_images()
        engine.train()
        row: dict[str, Any] = {m.EVAL_LOSS: (total[0] / total[1]).item()}
        if rank == 0:
            columns = classes if conditional else min(8, grid_n)
            row["samples"] = image_grid(to_uint8(samples[:grid_n]), columns)
            if fid is not None:
                row.update(fid(samples[: spec.sampling.fid_samples]))
        return row

    def sample_images() -> torch.Tensor:
        """Fixed-seed images (EMA weights when kept): every rank denoises its share (and
        decodes it, for latent diffusion)."""
        per_rank = -(-n_samples // world)  # equal shares: ZeRO-3 needs every rank in each forward
        indices = list(range(rank * per_rank, (rank + 1) * per_rank))
        sampler = DDIMScheduler.from_config(noise_scheduler.config)
        out = []
        for chunk in range(0, per_rank, _GENERATE_BATCH):
            part = indices[chunk : chunk + _GENERATE_BATCH]
            noise, _ = seeded_noise(shape, spec.train.seed, part)  # DDIM: deterministic
            labels = torch.tensor(part, device=device) % classes if conditional else None
            x = generate(
                engine.module,
                sampler,
                noise.to(device),
                labels,
                spec.sampling.steps,
                guidance_scale=guidance,
                null_class=NULL_CLASS,
            )
            out.append(decode_scaled(vae, x) if latent else x)
        mine = torch.cat(out).float().contiguous()
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        return torch.cat(gathered)[:n_samples].cpu()

    engine.train()
    last_metrics: dict[str, Any] = {}

    def save(step: int, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint every rank's shard and EMA (and report it to Ray Train) at `step`."""
        numeric = {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))}
        rank_state = {"ema": ema.state_dict()} if ema else None
        save_and_report(engine, step, {**numeric, **(extra or {})}, {"step": step}, rank_state)
        if log:
            log.sync()

    step = start_step
    watch = PreemptionWatch(device)
    window = TrainWindow(spec, world, device)
    while step < spec.train.max_steps:
        for _ in range(spec.train.grad_accum):
            images, labels = to_inputs(next(batches), training=True)  # (B, *shape)
            if spec.data.random_flip:
                flip = torch.rand(len(images), device=device) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            noise = torch.randn_like(images)
            t = torch.randint(0, T, (len(images),), device=device)
            loss = diffusion_loss(engine, noise_scheduler, images, labels, noise, t)
            engine.backward(loss)
            engine.step()  # DeepSpeed only updates at the accumulation boundary
            window.add(loss)
        step += 1
        if ema:
            ema.update(step)

        is_last = step == spec.train.max_steps
        row = window.end_step(step, scheduler.get_last_lr()[0], is_last)
        if step % spec.train.eval_every == 0 or is_last:
            evaluated = evaluate()
            grid = evaluated.pop("samples", None)
            if grid is not None and log:
                log.log_image(step, grid)
            row = {m.STEP: step, **row, **evaluated}
        if row and log:
            log.log(row)
        last_metrics.update(row)
        if row:
            window.reset()
        if checkpoint_cadence(step, is_last, spec, save, watch, run_dir, rank, config.get("gate")):
            window.restart_clock()  # checkpoint time is not step time

    export_pipeline(
        engine, ema, scheduler_spec, run_dir, rank, spec.deepspeed.zero_stage, vae, classes
    )
    if log:
        log.close()


def _grid_size(requested: int, classes: int) -> int:
    """Images in an evaluation grid: whole rows of one image per class when conditional."""
    return -(-requested // classes) * classes if classes else requested


def export_pipeline(
    engine: Any,
    ema: WeightAverage | None,
    scheduler_spec: NoiseSchedulerSpec,
    run_dir: str,
    rank: int,
    zero_stage: int,
    vae: Any = None,
    classes: int = 0,
) -> None:
    """Save the (EMA) network as a diffusers pipeline in `<run>/model` (`build_pipeline`).

    `DDPMPipeline.from_pretrained(dir)` (DDIMPipeline, DiTPipeline) loads it. All ranks must
    call this: with ZeRO-3 the weights are gathered from every partition.
    """
    with ema.swapped_in() if ema else contextlib.nullcontext():
        if zero_stage == 3:
            state_dict = engine._zero3_consolidated_16bit_state_dict()
        else:
            state_dict = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank != 0:
        return
    if ema and zero_stage != 3:  # the fp32 average itself, not its low-precision copy
        names = [name for name, _ in engine.module.named_parameters()]
        state_dict.update(dict(zip(names, ema.shadow, strict=True)))
    net = type(engine.module).from_config(engine.module.config)
    net.load_state_dict({k: v.float().cpu() for k, v in state_dict.items()})
    pipeline = build_pipeline(net, scheduler_spec, vae.to("cpu") if vae else None, classes)
    publish_dir(join(run_dir, MODEL_DIR), MODEL_KIND, pipeline.save_pretrained, key="run.storage")
