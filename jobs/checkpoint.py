"""Checkpoint save/restore of a DeepSpeed engine through Ray Train (runs on workers)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
_STEP_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_of_checkpoint(path: str) -> int | None:
    """The step a checkpoint directory was saved at, from its name."""
    match = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def save_and_report(engine: Any, step: int, metrics: dict[str, Any], client_state: dict) -> None:
    """Every rank saves its DeepSpeed shard, then all report it as one Ray Train checkpoint.

    Ray Train merges the ranks' directories into `<run>/checkpoint_<step>/` and registers the
    checkpoint only after every rank's upload finished, so a checkpoint is whole or absent.
    """
    import ray.train

    tmp = tempfile.mkdtemp(prefix="raygen-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=f"step_{step:08d}", client_state=client_state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(step),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_latest(engine: Any) -> tuple[int, dict[str, Any]]:
    """Load the latest Ray Train checkpoint into `engine`.

    Returns:
        (step, client_state); (0, {}) when there is nothing to resume from.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as path:
        load_path, client_state = engine.load_checkpoint(path)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {checkpoint.path}")
    return int(client_state["step"]), client_state
