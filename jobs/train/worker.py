"""Small helpers shared by the training loops that run on Ray Train workers."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from raygen.cluster.storage import append_line, join
from raygen.jobs.run_dir import ATTEMPTS_FILE, INTERRUPTIONS_FILE, PREEMPTED
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train import metrics as m

logger = logging.getLogger(__name__)


def micro_batches(spec: TrainSpec, shard: Any, per_epoch: int, skip: int):
    """Endless micro-batches of this rank's shard, one epoch after another.

    Resumes exactly: the order is fixed by the seed and epoch, and the first `skip`
    micro-batches (already trained on) are passed over.
    """
    if per_epoch == 0:
        raise RuntimeError("the training shard holds less than one micro-batch")
    epoch, offset = divmod(skip, per_epoch)
    while True:
        iterator = shard.iter_torch_batches(
            batch_size=spec.train.micro_batch_size,
            drop_last=True,
            local_shuffle_buffer_size=max(spec.train.micro_batch_size * 16, 256),
            local_shuffle_seed=spec.train.seed * 100_003 + epoch,
        )
        for i, batch in enumerate(iterator):
            if i >= per_epoch:
                break
            if i >= offset:
                yield batch
        epoch, offset = epoch + 1, 0


def build_optimizer(spec: TrainSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norms; DeepSpeed's CPU Adam when offloading."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # ZeRO-3 parameters are flat partitions; `ds_shape` keeps the real shape.
            ndim = len(getattr(param, "ds_shape", param.shape))
            (decay if ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": spec.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if spec.deepspeed.offload_optimizer == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=spec.train.lr, betas=spec.train.adam_betas)
    return torch.optim.AdamW(groups, lr=spec.train.lr, betas=spec.train.adam_betas)


def lr_lambda(spec: TrainSpec):
    """Multiplier of the peak LR at each step: linear warm-up, then the spec's decay."""
    t = spec.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        if t.lr_schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay

    return factor


def apply_peak_lr(scheduler: Any, lr: float) -> None:
    """Make `lr` the peak of a LambdaLR schedule, also after restoring a checkpoint.

    A checkpoint restores the LR it was saved with; a resumed run whose spec sets another LR
    (`--set train.lr=...`, or a PBT trial continuing another trial's weights) uses its own.
    """
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)


def compute_dtype(spec: TrainSpec) -> torch.dtype:
    """The dtype the engines compute in: what inputs are cast to."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.train.precision, torch.float32)


def resume(
    engine: Any, schedulers: list[Any], spec: TrainSpec, config: dict[str, Any], rank: int
) -> tuple[int, dict[str, Any], dict[str, Any] | None, m.MetricsLog | None]:
    """What every training loop does once its engines are built: restore the latest
    checkpoint (`checkpoint.restore_latest`: one engine or {name: engine}), make the spec's
    LR the schedules' peak, seed this rank for the step it starts at, record the attempt and
    open the metrics log (rank 0). Returns (start step, client state, this rank's state,
    the log or None)."""
    from raygen.jobs.train.checkpoint import restore_latest

    start_step, client_state, rank_state = restore_latest(engine, config.get("start_from"))
    for scheduler in schedulers:
        apply_peak_lr(scheduler, spec.train.lr)
    seed_everything(spec.train.seed * 1_000_003 + start_step * 1009 + rank)
    log = None
    if rank == 0:
        record_attempt(config["run_dir"], start_step, config["launched_at"])
        log = m.MetricsLog(config["run_dir"], start_step)
    return start_step, client_state, rank_state, log


def trains_new_token_rows(spec: TrainSpec) -> bool:
    """Whether a chat template's new token rows train with LoRA adapters: everywhere but
    ZeRO-3 on CPUs, where PEFT cannot gather them (its code for it is CUDA-only); there they
    keep their distinct initial values."""
    return not (spec.deepspeed.zero_stage == 3 and not spec.scaling.use_gpu)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def record_attempt(run_dir: str, resumed_from_step: int, launched_at: float) -> None:
    """Append this start of the worker group to the run's attempt log (rank 0): when the
    training function began (`launched_at`, from `start_worker`) and when its model was
    ready to train (`started_at`)."""
    import ray
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    entry = {
        "launched_at": launched_at,
        "started_at": time.time(),
        "resumed_from_step": resumed_from_step,
        "rank0_pid": os.getpid(),
        "rank0_node": os.uname().nodename,
        "rank0_node_id": ray.get_runtime_context().get_node_id(),
        "torch_threads": torch.get_num_threads(),
        # The worker group's resources: a sweep checks they are released when its trial ends.
        "placement_group": group.id.hex() if group else None,
    }
    append_line(join(run_dir, ATTEMPTS_FILE), json.dumps(entry))


def record_interruption(run_dir: str, kind: str, **details: Any) -> None:
    """Append an interruption of the run (a failure, a preemption notice) to its log."""
    entry = {"at": time.time(), "kind": kind, **details}
    append_line(join(run_dir, INTERRUPTIONS_FILE), json.dumps(entry))


class PreemptionWatch:
    """Ray Train's preemption notices, polled at step boundaries on every rank.

    `ray.train.get_preemption_info()` is a collective (every rank must call it equally
    often) and costs an actor call, so it is polled about every PREEMPTION_POLL_S of
    training: the step interval is agreed by all ranks after the first steps.
    """

    PREEMPTION_POLL_S = 2.0
    CALIBRATION_STEPS = 5

    def __init__(self, device: Any):
        self.device = device
        self.calls = 0
        self.every: int | None = None
        self.started = time.perf_counter()

    def check(self) -> Any:
        """The preemption notice (a `ray.train.PreemptionInfo`) if one has come, else None.
        Call once per step on every rank."""
        import ray.train

        self.calls += 1
        if self.every is None and self.calls == self.CALIBRATION_STEPS:
            import torch.distributed as dist

            step_s = torch.tensor(
                [(time.perf_counter() - self.started) / self.calls], device=self.device
            )
            dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # the slowest rank decides for all
            self.every = max(1, int(self.PREEMPTION_POLL_S / max(step_s.item(), 1e-6)))
        if self.every is not None and self.calls % self.every:
            return None
        return ray.train.get_preemption_info()

    @staticmethod
    def wait(info: Any, grace_s: float) -> None:
        """Stop training until Ray Train tears the workers down at the preemption's deadline
        (it then restarts them elsewhere, from the checkpoint just taken). Returns only if
        that did not happen: the notice was withdrawn, and training goes on."""
        deadline = (info.deadline_ms / 1000 if info.deadline_ms else time.time()) + grace_s
        while time.time() < deadline + PREEMPTION_TEARDOWN_MARGIN_S:
            time.sleep(0.5)


def checkpoint_on_preemption(
    watch: PreemptionWatch,
    step: int,
    saved: bool,
    save: Callable[[int, dict[str, Any]], None],
    run_dir: str,
    rank: int,
    grace_s: float,
) -> None:
    """At a step boundary: if a node of this run is being preempted, checkpoint now (unless
    this step just was) and stop until Ray Train restarts the run from it elsewhere.

    Args:
        saved: whether this step's periodic checkpoint was just taken.
        save: takes the checkpoint: (step, extra metrics for its report).
    """
    info = watch.check()
    if info is None:
        return
    if rank == 0:
        record_interruption(
            run_dir,
            PREEMPTED,
            step=step,
            deadline_ms=info.deadline_ms,
            nodes=info.preempted_node_ids,
        )
    if not saved:
        save(step, {m.PREEMPTION_CHECKPOINT: 1})
    logger.warning(
        "node(s) %s are being preempted: checkpointed step %d; waiting for Ray Train to "
        "restart the run elsewhere",
        ", ".join(info.preempted_node_ids),
        step,
    )
    watch.wait(info, grace_s)
    logger.warning("the preemption did not come; training goes on")


# Past a preemption's deadline (and grace), how long to wait for Ray Train's teardown
# before concluding it will not come.
PREEMPTION_TEARDOWN_MARGIN_S = 60.0


def wait_for_scheduler(gate: Any, rank: int) -> None:
    """In a sweep trial whose scheduler pauses trials (successive halving, PBT): hold every
    rank after a report until the trial's driver says Tune let the trial go on.

    A paused or stopped trial is killed with its workers; without the wait they would train
    past the last report Tune holds, and the run, resumed later from its own newest
    checkpoint, would be ahead of what the scheduler compared.
    """
    if gate is None:
        return
    import torch.distributed as dist

    if rank == 0:
        gate.get()
    dist.barrier()


class TrainWindow:
    """The training metrics between two log steps, shared by the training loops: the mean
    loss (summed on the device: no host sync per micro-batch), step time and throughput.
    Time spent evaluating or checkpointing is not step time."""

    def __init__(
        self,
        spec: TrainSpec,
        world: int,
        device: Any,
        tokens_per_step: int = 0,
        samples_per_step: int | None = None,
    ):
        """`samples_per_step`: training examples read per optimizer step over all workers
        (default: the global batch size; a GAN's discriminator reads one per update)."""
        from raygen.jobs.spec import global_batch_size

        self.spec, self.world, self.tokens_per_step = spec, world, tokens_per_step
        self.samples_per_step = samples_per_step or global_batch_size(spec, world)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.counted = torch.zeros((), dtype=torch.float64, device=device)
        self.counting = False  # losses come as sums over counted tokens
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """One micro-batch's mean loss; or, with `tokens`, its loss summed over that many
        counted tokens (the window's loss is then the mean over every counted token)."""
        if tokens is None:
            self.loss += loss.detach().double() / self.spec.train.grad_accum
            return
        self.counting = True
        self.loss += loss.detach().double()
        self.counted += tokens.detach().double()

    def end_step(self, step: int, lr: float, is_last: bool) -> dict[str, Any]:
        """Count a finished optimizer step; at a log step (every `train.log_every` and the
        last) return the window's metrics, else {}. A collective: every rank calls it after
        every step."""
        self.steps += 1
        if step % self.spec.train.log_every and not is_last:
            return {}
        import torch.distributed as dist

        elapsed = time.perf_counter() - self.start
        if self.counting:
            totals = torch.stack([self.loss, self.counted])
            dist.all_reduce(totals)
            train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        else:
            mean_loss = self.loss / self.steps
            dist.all_reduce(mean_loss)
            train_loss = mean_loss.item() / self.world
        row = {
            m.STEP: step,
            m.TRAIN_LOSS: train_loss,
            m.LR: lr,
            m.STEP_TIME_S: elapsed / self.steps,
            m.SAMPLES_PER_S: self.samples_per_step * self.steps / elapsed,
        }
        if self.tokens_per_step:
            row[m.TOKENS_PER_S] = self.tokens_per_step * self.steps / elapsed
        if self.counting:
            row[m.LOSS_TOKENS] = totals[1].item() / self.steps
        return row

    def reset(self) -> None:
        """After a logged row: the next window starts now, empty."""
        self.loss.zero_()
        self.counted.zero_()
        self.steps, self.start = 0, time.perf_counter()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()


def checkpoint_cadence(
    step: int,
    is_last: bool,
    spec: TrainSpec,
    save: Callable[[int], None],
    watch: PreemptionWatch,
    run_dir: str,
    rank: int,
    gate: Any,
) -> bool:
    """After a step: checkpoint every `train.checkpoint_every` steps and at the end, let a
    pausing scheduler decide (`wait_for_scheduler`), and checkpoint at a preemption notice.
    Returns whether this step was checkpointed."""
    saved = step % spec.train.checkpoint_every == 0 or is_last
    if saved:
        save(step)
        if not is_last:
            wait_for_scheduler(gate, rank)
    if not is_last:
        checkpoint_on_preemption(
            watch, step, saved, save, run_dir, rank, spec.run.preemption_grace_s
        )
    return saved


def start_worker(config: dict[str, Any]) -> tuple[TrainSpec, int, int]:
    """What every training loop does first on its worker: read the spec, give PyTorch a
    thread per CPU of the worker, join the process group (NCCL on GPUs, gloo on CPUs),
    seed, and read a remote pretrained model from the local, content-keyed cache. Returns
    (spec, rank, world size). Notes when it began in `config["launched_at"]`."""
    config["launched_at"] = time.time()
    import deepspeed
    import ray.train

    from raygen.cluster.storage import local_copy

    spec = TrainSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # PyTorch's threads: the worker's CPUs (a sweep's trials leave their drivers 0.01).
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, round(cpus)))
    deepspeed.init_distributed(dist_backend="nccl" if spec.scaling.use_gpu else "gloo")
    seed_everything(spec.train.seed)
    if spec.model.pretrained:
        model_spec = spec.model.model_copy(update={"pretrained": local_copy(spec.model.pretrained)})
        spec = spec.model_copy(update={"model": model_spec})
    return spec, rank, world
