"""Checkpoint save/restore of a DeepSpeed engine through Ray Train (runs on workers)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

from raygen.jobs.run_dir import checkpoint_dir_name

logger = logging.getLogger(__name__)

RANK_STATE_DIR = "rank_state"


def save_and_report(
    engine: Any,
    step: int,
    metrics: dict[str, Any],
    client_state: dict,
    rank_state: dict[str, Any] | None = None,
) -> None:
    """Every rank saves its DeepSpeed shard, then all report it as one Ray Train checkpoint.

    `engine` is one DeepSpeed engine, or {name: engine} for a run that trains several
    networks (a GAN's generator and discriminator), each saved in its own folder. Ray Train
    merges the ranks' directories into `<run>/checkpoint_<step>/` and registers the
    checkpoint only after every rank's upload finished, so a checkpoint is whole or absent.
    `rank_state` is this rank's own extra state (e.g. its shard of an EMA of the weights).
    """
    import ray.train
    import torch

    tmp = tempfile.mkdtemp(prefix="raygen-ckpt-")
    try:
        # A LoRA run's frozen weights are rebuilt from the model it started from: only what
        # trains (the adapters) is saved, with its optimizer state.
        for name, one in _named(engine).items():
            one.save_checkpoint(
                os.path.join(tmp, name),
                tag=f"step_{step:08d}",
                client_state=client_state,
                exclude_frozen_parameters=_has_frozen(one),
            )
        if rank_state is not None:
            os.makedirs(os.path.join(tmp, RANK_STATE_DIR))
            torch.save(rank_state, os.path.join(tmp, RANK_STATE_DIR, _rank_file()))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(step),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_latest(
    engine: Any, start_from: str | None = None
) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    """Load the latest Ray Train checkpoint of this run into `engine` (one, or {name:
    engine} as `save_and_report` saved them).

    Args:
        start_from: a checkpoint (path or URI) of another run, loaded when this run has
            none of its own yet (a PBT trial continuing a better trial's weights).

    Returns:
        (step, client_state, this rank's rank_state or None); (0, {}, None) when there is
        nothing to resume from.
    """
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and start_from:
        from raygen.cluster.storage import ray_location

        path, filesystem = ray_location(start_from)
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    if checkpoint is None:
        return 0, {}, None
    with checkpoint.as_directory() as path, data_only_loads():
        for name, one in _named(engine).items():
            load_path, client_state = one.load_checkpoint(
                os.path.join(path, name), load_module_strict=not _has_frozen(one)
            )
            if load_path is None:
                break
        rank_file = os.path.join(path, RANK_STATE_DIR, _rank_file())
        rank_state = (
            torch.load(rank_file, map_location="cpu", weights_only=True)
            if os.path.exists(rank_file)
            else None
        )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {checkpoint.path}")
    return int(client_state["step"]), client_state, rank_state


def _named(engine: Any) -> dict[str, Any]:
    """{folder in the checkpoint: engine}; a single engine's is the checkpoint itself."""
    return engine if isinstance(engine, dict) else {"": engine}


def _has_frozen(engine: Any) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


@contextlib.contextmanager
def data_only_loads() -> Iterator[None]:
    """Every `torch.load` in the block reads data only (weights_only=True), whatever its
    caller asks: DeepSpeed's checkpoint loading and consolidation (zero_to_fp32) pass
    weights_only=False, which would unpickle, and so run, whatever a checkpoint file holds:
    whoever could write to the run's storage could run code where it is resumed or
    exported. The DeepSpeed types its checkpoints carry (plain data classes and enums) are
    allowed by name; `torch.load` is replaced for the block, in this process."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    with (
        torch.serialization.safe_globals(
            [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
        ),
        mock.patch.object(torch, "load", load),
    ):
        yield


def _rank_file() -> str:
    import ray.train

    return f"rank_{ray.train.get_context().get_world_rank():05d}.pt"
