"""The GAN training loop that runs on every Ray Train worker: two DeepSpeed engines (the
generator's and the discriminator's, each with its own ZeRO partitioning and optimizer)
taking turns."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from raygen.cluster.publish import publish_dir
from raygen.cluster.storage import join
from raygen.jobs.data.pixels import batch_to_tensors
from raygen.jobs.gan_facts import DCGAN_DEFAULTS
from raygen.jobs.models import dcgan
from raygen.jobs.models.diffusion import seeded_noise, to_uint8
from raygen.jobs.models.gan import build_gan, discriminator_loss, generator_loss, r1_penalty
from raygen.jobs.run_dir import MODEL_DIR, MODEL_KIND
from raygen.jobs.sampling import image_grid
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

logger = logging.getLogger(__name__)

GENERATOR, DISCRIMINATOR = "generator", "discriminator"  # their folders in a checkpoint
GENERATOR_CONFIG = "config.json"  # the export's: {"_class_name": "Generator", "kwargs": ...}
GENERATOR_WEIGHTS = "model.safetensors"
GENERATOR_CODE = "dcgan.py"  # the architecture's source, copied into the export
D_LOSS = "d_loss"  # the discriminator's loss, averaged like train_loss (the generator's)
_GENERATE_BATCH = 256


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train the spec's GAN with DeepSpeed on this worker; rank 0 logs, samples and exports."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    spec, rank, world = start_worker(config)
    run_dir, prepared = config["run_dir"], config["prepared"]
    shape = tuple(prepared["image_shape"])  # (C, H, W)
    kind, r1 = spec.model.gan_loss, spec.model.r1_gamma
    generator, discriminator = build_gan(spec.model)
    classes, latent_dim = generator.num_classes, generator.latent_dim
    grid_n = (
        -(-spec.sampling.grid_images // classes) * classes if classes else spec.sampling.grid_images
    )
    with_fid = bool(prepared.get("fid")) and spec.sampling.fid_samples > 0
    n_samples = max(grid_n, spec.sampling.fid_samples if with_fid else 0)

    d_steps = spec.train.d_steps_per_g
    by_step = lr_lambda(spec)
    # The schedules follow the run's steps: the discriminator's takes d_steps updates a step.
    factors = {GENERATOR: by_step, DISCRIMINATOR: lambda update: by_step(update // d_steps)}
    engines, schedulers = {}, {}
    for name, net in ((GENERATOR, generator), (DISCRIMINATOR, discriminator)):
        ds_config = derive_deepspeed_config(spec, world, max(p.numel() for p in net.parameters()))
        engines[name], _, _, schedulers[name] = deepspeed.initialize(
            model=net,
            optimizer=build_optimizer(spec, net),
            lr_scheduler=lambda opt, f=factors[name]: torch.optim.lr_scheduler.LambdaLR(opt, f),
            config=ds_config,
        )
    g, d = engines[GENERATOR], engines[DISCRIMINATOR]
    device = g.device
    dtype = compute_dtype(spec)
    ema = WeightAverage(g.module, spec.model.ema.decay) if spec.model.ema else None
    start_step, _, rank_state, log = resume(engines, list(schedulers.values()), spec, config, rank)
    if ema and rank_state:
        ema.load_state_dict(rank_state["ema"])

    fid = None
    if rank == 0 and with_fid:
        from raygen.jobs.eval.fid import SampleFid

        fid = SampleFid(
            prepared["dir"], prepared["fid"]["extractor"], spec.sampling.inception_weights
        )

    train_shard = ray.train.get_dataset_shard("train")
    micro_per_epoch = prepared["train_examples"] // world // spec.train.micro_batch_size
    batches = micro_batches(spec, train_shard, micro_per_epoch, start_step * d_steps)

    def to_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = batch_to_tensors(batch, shape)
        return images.to(device, dtype), labels.to(device) if classes else None

    def sample_images() -> torch.Tensor:
        """Fixed-seed samples of the (EMA) generator in eval mode: every rank its share."""
        per_rank = -(-n_samples // world)  # equal shares: ZeRO-3 needs every rank in each forward
        indices = list(range(rank * per_rank, (rank + 1) * per_rank))
        out = []
        g.eval()
        with torch.no_grad(), ema.swapped_in() if ema else contextlib.nullcontext():
            for start in range(0, per_rank, _GENERATE_BATCH):
                part = indices[start : start + _GENERATE_BATCH]
                latents, _ = seeded_noise((latent_dim,), spec.train.seed, part)
                labels = torch.tensor(part, device=device) % classes if classes else None
                out.append(g(latents.to(device, dtype), labels).float())
        g.train()
        mine = torch.cat(out).contiguous()
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        return torch.cat(gathered)[:n_samples].cpu()

    def evaluate() -> dict[str, Any]:
        samples = sample_images()
        row: dict[str, Any] = {}
        if rank == 0:
            row["samples"] = image_grid(to_uint8(samples[:grid_n]), classes or min(8, grid_n))
            if fid is not None:
                row.update(fid(samples[: spec.sampling.fid_samples]))
        return row

    last_metrics: dict[str, Any] = {}

    def save(step: int, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint both networks on every rank (and the EMA), reported as one checkpoint."""
        numeric = {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))}
        rank_state = {"ema": ema.state_dict()} if ema else None
        save_and_report(engines, step, {**numeric, **(extra or {})}, {"step": step}, rank_state)
        if log:
            log.sync()

    def requires_grad(module: torch.nn.Module, flag: bool) -> None:
        for param in module.parameters():
            param.requires_grad_(flag)

    step = start_step
    watch = PreemptionWatch(device)
    # The generator's loss as train_loss; samples/s counts the real images the
    # discriminator reads (d_steps micro-batches a step).
    window = TrainWindow(
        spec, world, device, samples_per_step=spec.train.micro_batch_size * d_steps * world
    )
    d_window = torch.zeros((), dtype=torch.float64, device=device)
    while step < spec.train.max_steps:
        for _ in range(d_steps):
            real, labels = to_inputs(next(batches))  # (B, C, H, W) in [-1, 1]
            if spec.data.random_flip:
                flip = torch.rand(len(real), device=device) < 0.5
                real = torch.where(flip[:, None, None, None], real.flip(-1), real)
            latents = torch.randn(len(real), latent_dim, device=device, dtype=dtype)
            with torch.no_grad():
                fake = g(latents, labels)
            real.requires_grad_(r1 > 0)
            both = torch.cat([real, fake])
            # With R1 the scores are differentiated twice (their gradient on the real images
            # first): the module is called directly, since DeepSpeed's engine would take that
            # inner gradient for its own backward pass. Its step still reduces the gradients.
            score = d.module if r1 > 0 else d
            scores = score(both, torch.cat([labels, labels]) if classes else None)
            real_scores, fake_scores = scores[: len(real)], scores[len(real) :]
            loss_d = discriminator_loss(real_scores, fake_scores, kind)
            if r1 > 0:
                loss_d = loss_d + r1 / 2 * r1_penalty(real_scores, real)
            d.backward(loss_d)
            d.step()
            d_window += loss_d.detach().double() / d_steps
        # The generator's turn: the discriminator scores its images without training, its
        # module called directly so that its engine does not take this backward for its own.
        latents = torch.randn(len(real), latent_dim, device=device, dtype=dtype)
        requires_grad(d.module, False)
        loss_g = generator_loss(d.module(g(latents, labels), labels), kind)
        g.backward(loss_g)
        g.step()
        requires_grad(d.module, True)
        window.add(loss_g)
        step += 1
        if ema:
            ema.update(step)

        is_last = step == spec.train.max_steps
        row = window.end_step(step, schedulers[GENERATOR].get_last_lr()[0], is_last)
        if row:
            dist.all_reduce(d_window)
            row[D_LOSS] = d_window.item() / world / window.steps
            d_window.zero_()
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

    kwargs = {**DCGAN_DEFAULTS, **spec.model.config}
    export_generator(g, ema, kwargs, run_dir, rank, spec.deepspeed.zero_stage)
    if log:
        log.close()


def export_generator(
    engine: Any,
    ema: WeightAverage | None,
    kwargs: dict[str, Any],
    run_dir: str,
    rank: int,
    zero_stage: int,
) -> None:
    """Save the (EMA) generator in `<run>/model`: its weights in safetensors, its config,
    and the source of its architecture, which plain PyTorch loads (docs/gan.md). All ranks
    must call this: with ZeRO-3 the weights are gathered from every partition."""
    with ema.swapped_in() if ema else contextlib.nullcontext():
        if zero_stage == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank != 0:
        return
    if ema and zero_stage != 3:  # the fp32 average itself, not its low-precision copy
        names = [name for name, _ in engine.module.named_parameters()]
        state.update(dict(zip(names, ema.shadow, strict=True)))
    publish_dir(
        join(run_dir, MODEL_DIR), MODEL_KIND, generator_writer(kwargs, state), key="run.storage"
    )


def generator_writer(kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    """A writer of a generator export (weights, config, architecture) into a directory."""
    from safetensors.torch import save_file

    weights = {k: v.float().cpu().contiguous() for k, v in state.items()}
    dcgan.Generator(**kwargs).load_state_dict(weights)  # the export loads: checked before writing

    def write(out: str) -> None:
        root = Path(out)
        root.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(root / GENERATOR_WEIGHTS))
        config = {"_class_name": "Generator", "architecture": "dcgan", "kwargs": kwargs}
        (root / GENERATOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(dcgan.__file__, root / GENERATOR_CODE)

    return write
