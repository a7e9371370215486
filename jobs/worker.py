"""Small helpers shared by the training loops that run on Ray Train workers."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.storage import append_line, is_remote, join, upload_dir
from jobs.spec import TrainSpec

ATTEMPTS_FILE = "attempts.jsonl"
MODEL_DIR = "model"


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def record_attempt(run_dir: str, resumed_from_step: int) -> None:
    """Append this start of the worker group to the run's attempt log (rank 0)."""
    entry = {
        "started_at": time.time(),
        "resumed_from_step": resumed_from_step,
        "rank0_pid": os.getpid(),
        "rank0_node": os.uname().nodename,
    }
    append_line(join(run_dir, ATTEMPTS_FILE), json.dumps(entry))


def publish_dir(run_dir: str, name: str, write: Callable[[str], None]) -> None:
    """Let `write(dir)` fill a directory, then publish it as `<run_dir>/<name>` whole.

    Locally the finished directory is renamed into place, so `<name>` is never half
    written. On object storage (no renames) the files are uploaded after they are all
    written; `result.json`, written after, marks the export complete.
    """
    if is_remote(run_dir):
        with tempfile.TemporaryDirectory(prefix=f"raygen-{name}-") as tmp:
            write(tmp)
            upload_dir(tmp, join(run_dir, name))
        return
    final, tmp = Path(run_dir, name), Path(run_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


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
