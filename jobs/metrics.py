"""Metric names shared by training, tuning and audits, and the rank-0 metrics log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STEP = "step"
TRAIN_LOSS = "train_loss"
LR = "lr"
SAMPLES_PER_S = "samples_per_s"
TOKENS_PER_S = "tokens_per_s"
STEP_TIME_S = "step_time_s"
EVAL_LOSS = "eval_loss"
PERPLEXITY = "perplexity"

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped to stay finite in JSON."""
    return math.exp(min(loss, 50.0))


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard.

    Runs on rank 0 only. On resume, rows after the checkpoint being resumed from are dropped,
    so the file shows the trajectory the final model actually followed.
    """

    def __init__(self, run_dir: str, resumed_from_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir, METRICS_FILE)
        kept = [row for row in read_metrics(self.path) if row[STEP] <= resumed_from_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)
        self._file = self.path.open("a")
        self._tb = SummaryWriter(
            str(Path(run_dir, TENSORBOARD_DIR)), purge_step=resumed_from_step + 1
        )

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in row.items():
            if key != STEP and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, row[STEP])

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a `metrics.jsonl` (an absent file has none; a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
