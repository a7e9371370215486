"""Metric names shared by training, tuning and audits, and the rank-0 metrics log."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from cluster import storage

STEP = "step"
TRAIN_LOSS = "train_loss"
LR = "lr"
SAMPLES_PER_S = "samples_per_s"
TOKENS_PER_S = "tokens_per_s"
STEP_TIME_S = "step_time_s"
EVAL_LOSS = "eval_loss"
PERPLEXITY = "perplexity"
WORST_GROUP_EVAL_LOSS = "worst_group_eval_loss"  # runs with train.group_weighting
GROUP_EVAL_LOSS_PREFIX = "eval_loss/"  # + the group's name: its mean eval token loss
FID = "fid"
FID_EXTRACTOR = "fid_extractor"  # the network whose features the FID compares

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped to stay finite in JSON."""
    return math.exp(min(loss, 50.0))


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard.

    Runs on rank 0 only. On resume, rows after the checkpoint being resumed from are dropped,
    so the file shows the trajectory the final model actually followed. With a remote run
    dir the files are written in a local staging dir and uploaded: `metrics.jsonl` at every
    row, TensorBoard events at `sync()` (each checkpoint) and `close()`.
    """

    def __init__(self, run_dir: str, resumed_from_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.remote = storage.is_remote(run_dir)
        self.local_dir = tempfile.mkdtemp(prefix="raygen-metrics-") if self.remote else run_dir
        if self.remote:
            storage.download_dir(
                storage.join(run_dir, TENSORBOARD_DIR), str(Path(self.local_dir, TENSORBOARD_DIR))
            )
        kept = [
            row
            for row in read_metrics(storage.join(run_dir, METRICS_FILE))
            if row[STEP] <= resumed_from_step
        ]
        self.path = Path(self.local_dir, METRICS_FILE)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._upload_metrics()
        self._file = self.path.open("a")
        self._tb = SummaryWriter(
            str(Path(self.local_dir, TENSORBOARD_DIR)), purge_step=resumed_from_step + 1
        )

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in row.items():
            if key != STEP and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, row[STEP])
        self._upload_metrics()

    def log_image(self, step: int, image: Any) -> str:
        """Save a uint8 (H, W, C) sample grid as `samples/step_XXXXXX.png` and in TensorBoard.

        Returns the PNG's path or URI.
        """
        from jobs.models.diffusion import save_png

        name = f"step_{step:06d}.png"
        local = Path(self.local_dir, SAMPLES_DIR, name)
        local.parent.mkdir(parents=True, exist_ok=True)
        scale = max(1, round(768 / max(image.shape[:2])))  # small grids are enlarged
        save_png(image, local, scale=scale)
        self._tb.add_image("samples", image, step, dataformats="HWC")
        uri = storage.join(self.run_dir, SAMPLES_DIR, name)
        if self.remote:
            storage.upload_file(str(local), uri)
        return uri

    def sync(self) -> None:
        """Upload the TensorBoard events (remote run dirs only)."""
        self._tb.flush()
        if self.remote:
            storage.upload_dir(
                str(Path(self.local_dir, TENSORBOARD_DIR)),
                storage.join(self.run_dir, TENSORBOARD_DIR),
            )

    def close(self) -> None:
        self._file.close()
        self.sync()
        self._tb.close()

    def _upload_metrics(self) -> None:
        if self.remote:
            storage.write_text(storage.join(self.run_dir, METRICS_FILE), self.path.read_text())


def read_metrics(uri: str | Path) -> list[dict[str, Any]]:
    """All rows of a `metrics.jsonl` (an absent file has none; a torn last line is skipped)."""
    text = storage.read_text(str(uri))
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
