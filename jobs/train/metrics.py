"""Metric names shared by training, tuning and audits, and the rank-0 metrics log."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from raygen.cluster import storage
from raygen.jobs.run_dir import METRICS_FILE, SAMPLES_DIR, TENSORBOARD_DIR

STEP = "step"
TRAIN_LOSS = "train_loss"
LR = "lr"
SAMPLES_PER_S = "samples_per_s"
TOKENS_PER_S = "tokens_per_s"
LOSS_TOKENS = "loss_tokens"  # train.loss_on assistant: tokens the loss counted, per step
STEP_TIME_S = "step_time_s"
LOGGED_AT = "logged_at"  # Unix time the row was written
EVAL_LOSS = "eval_loss"
PERPLEXITY = "perplexity"
WORST_GROUP_EVAL_LOSS = "worst_group_eval_loss"  # runs with train.group_weighting
GROUP_EVAL_LOSS_PREFIX = "eval_loss/"  # + the group's name: its mean eval token loss
FID = "fid"
FID_EXTRACTOR = "fid_extractor"  # the network whose features the FID compares
IS_MEAN = "is_mean"  # Inception Score of the samples (the classifier's probabilities)...
IS_STD = "is_std"  # ...and its standard deviation over 10 splits
RECONSTRUCTION_ERROR = "reconstruction_error"  # VAE: the reconstruction loss on eval images
KL = "kl"  # VAE: mean KL divergence of the eval images' latents from the prior, per element
PSNR = "psnr"  # VAE: peak signal-to-noise ratio of the eval reconstructions, dB
MEAN_IMAGE_PSNR = "mean_image_psnr"  # VAE: the same for the eval set's mean image (baseline)
PREEMPTION_CHECKPOINT = "preemption_checkpoint"  # in a checkpoint's report: taken at a notice


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped to stay finite in JSON."""
    return math.exp(min(loss, 50.0))


# Remote run dirs: new rows go up as parts, not by re-uploading the whole file.
PARTS_SUFFIX = ".d"  # `metrics.jsonl.d/<time_ns>.jsonl`, read after metrics.jsonl, in name order
PART_INTERVAL_S = 10.0  # at most one part per this many seconds between checkpoints
RESUMED_FROM = "resumed_from"  # a part's record: rows after this step were not kept


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard.

    Runs on rank 0 only. On resume, rows after the checkpoint being resumed from are dropped,
    so the log shows the trajectory the final model actually followed. With a remote run
    dir the files are written in a local staging dir; the rows logged since the last upload
    go up as a new part of `metrics.jsonl.d/` (at most every PART_INTERVAL_S, and at each
    checkpoint), and `close()` writes the whole `metrics.jsonl` and removes the parts: the
    upload cost stays linear in the run's length. TensorBoard events go up at `sync()`.
    """

    def __init__(self, run_dir: str, resumed_from_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.uri = storage.join(run_dir, METRICS_FILE)
        self.remote = storage.is_remote(run_dir)
        self.local_dir = tempfile.mkdtemp(prefix="raygen-metrics-") if self.remote else run_dir
        if self.remote:
            storage.download_dir(
                storage.join(run_dir, TENSORBOARD_DIR), str(Path(self.local_dir, TENSORBOARD_DIR))
            )
        kept = [row for row in read_metrics(self.uri) if row[STEP] <= resumed_from_step]
        self.path = Path(self.local_dir, METRICS_FILE)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._pending = [{RESUMED_FROM: resumed_from_step}]
        self._uploaded_at = 0.0
        self._upload_part(force=True)
        self._file = self.path.open("a")
        self._tb = SummaryWriter(
            str(Path(self.local_dir, TENSORBOARD_DIR)), purge_step=resumed_from_step + 1
        )

    def log(self, row: dict[str, Any]) -> None:
        row = {**row, LOGGED_AT: round(time.time(), 3)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in row.items():
            if key not in (STEP, LOGGED_AT) and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, row[STEP])
        self._pending.append(row)
        self._upload_part()

    def log_image(self, step: int, image: Any, tag: str = "samples") -> str:
        """Save a uint8 (H, W, C) grid as `samples/step_XXXXXX.png` (another `tag`:
        `samples/<tag>_step_XXXXXX.png`) and in TensorBoard under `tag`.

        Returns the PNG's path or URI.
        """
        from raygen.jobs.sampling import save_png

        name = f"step_{step:06d}.png" if tag == "samples" else f"{tag}_step_{step:06d}.png"
        local = Path(self.local_dir, SAMPLES_DIR, name)
        local.parent.mkdir(parents=True, exist_ok=True)
        scale = max(1, round(768 / max(image.shape[:2])))  # small grids are enlarged
        save_png(image, local, scale=scale)
        self._tb.add_image(tag, image, step, dataformats="HWC")
        uri = storage.join(self.run_dir, SAMPLES_DIR, name)
        if self.remote:
            storage.upload_file(str(local), uri)
        return uri

    def sync(self) -> None:
        """Upload what is new: metric rows and TensorBoard events (remote run dirs only)."""
        self._tb.flush()
        self._upload_part(force=True)
        if self.remote:
            storage.upload_dir(
                str(Path(self.local_dir, TENSORBOARD_DIR)),
                storage.join(self.run_dir, TENSORBOARD_DIR),
            )

    def close(self) -> None:
        self._file.close()
        self.sync()
        self._tb.close()
        if self.remote:  # one file again: the whole log, then the parts it replaces
            storage.write_text(self.uri, self.path.read_text())
            parts = storage.join(self.run_dir, METRICS_FILE + PARTS_SUFFIX)
            storage.remove_dir(parts)

    def _upload_part(self, force: bool = False) -> None:
        if not self.remote or not self._pending:
            return
        if not force and time.monotonic() - self._uploaded_at < PART_INTERVAL_S:
            return
        name = f"{time.time_ns():020d}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in self._pending)
        storage.write_text(storage.join(self.uri + PARTS_SUFFIX, name), text)
        self._pending, self._uploaded_at = [], time.monotonic()


def read_metrics(uri: str | Path) -> list[dict[str, Any]]:
    """All rows of a `metrics.jsonl` in the order logged, with its parts when the run dir is
    remote (an absent file has none; a torn line is skipped)."""
    rows = metric_rows(storage.read_text(str(uri)))
    if storage.is_remote(str(uri)):
        for part in metric_parts(str(uri)):
            rows = apply_part(rows, metric_rows(storage.read_text(part)))
    return [row for row in rows if STEP in row]


def metric_parts(uri: str, after: str = "") -> list[str]:
    """URIs of the parts of a remote `metrics.jsonl` (named after `after`), in order."""
    from raygen.cluster.errors import StorageError

    try:
        parts = storage.list_files(uri + PARTS_SUFFIX, ".jsonl")
    except StorageError:  # none yet
        return []
    return [p.uri for p in parts if p.uri.rsplit("/", 1)[-1] > after]


def apply_part(rows: list[dict[str, Any]], part: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` followed by a part's rows; its `resumed_from` record drops the rows after it."""
    for record in part:
        if RESUMED_FROM in record:
            rows = [r for r in rows if r.get(STEP, 0) <= record[RESUMED_FROM]]
        else:
            rows.append(record)
    return rows


def metric_rows(text: str | None) -> list[dict[str, Any]]:
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # torn by a crash mid-write
            continue
    return rows
