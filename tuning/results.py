"""What a sweep leaves: `trials.parquet` (one row per trial), `best.json` (the best trial's
configuration and checkpoint) and `metric.png` (every trial's curve)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from raygen.cluster.storage import is_remote, join, read_text, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.spec import TrainSpec
from raygen.tuning.spec import SweepSpec
from raygen.tuning.trial import POINTER_FILE, evaluations_log
from raygen.tuning.validate import evaluations_of

logger = logging.getLogger(__name__)


TRIALS_FILE = "trials.parquet"


BEST_FILE = "best.json"


PLOT_FILE = "metric.png"


def summarize(
    sweep: SweepSpec, base: TrainSpec, results: Any, sweep_dir: str, source: str
) -> dict[str, Any]:
    """Write `trials.parquet`, `best.json` and the metric plot; return the summary."""
    import pyarrow as pa

    expected = evaluations_of(base)
    rows, curves = [], {}
    for result in results:
        trial_id, steps, values = _evaluations(result, sweep.metric, sweep_dir)
        curves[trial_id] = (steps, values)
        iterations = len(values)
        if result.error is not None:
            status = "errored"
        elif iterations < expected:
            status = "stopped_early"
        else:
            status = "completed"
        best_value = (min if sweep.mode == "min" else max)(values) if values else None
        checkpoint = _best_pointer(result, sweep)
        row = {
            "trial_id": trial_id,
            "status": status,
            "iterations": iterations,
            f"best_{sweep.metric}": best_value,
            f"last_{sweep.metric}": values[-1] if values else None,
            "checkpoint": checkpoint["checkpoint"] if checkpoint else None,
            "run_dir": checkpoint["run_dir"] if checkpoint else None,
            "error": _one_line(result.error) if result.error is not None else None,
        }
        for key in sweep.search:
            row[f"config.{key}"] = (result.config or {}).get(key)
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    table = pa.Table.from_pylist(rows)
    _write_table(table, join(sweep_dir, TRIALS_FILE))
    _plot(curves, sweep, join(sweep_dir, PLOT_FILE))

    scored = [r for r in rows if r[f"best_{sweep.metric}"] is not None and r["checkpoint"]]
    if not scored:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])
        raise SpecError(source, f"every trial failed ({errors or 'no evaluation reported'}).")
    pick = min if sweep.mode == "min" else max
    best = pick(scored, key=lambda r: r[f"best_{sweep.metric}"])
    best_spec = read_text(join(best["run_dir"], "spec.yaml"))
    summary = {
        "trial_id": best["trial_id"],
        "metric": sweep.metric,
        "mode": sweep.mode,
        "value": best[f"best_{sweep.metric}"],
        "checkpoint": best["checkpoint"],
        "run_dir": best["run_dir"],
        "config": {k: best[f"config.{k}"] for k in sweep.search},
        "spec": yaml.safe_load(best_spec) if best_spec else None,
    }
    write_text(join(sweep_dir, BEST_FILE), json.dumps(summary, indent=2))
    return {
        "sweep_dir": sweep_dir,
        "best": summary,
        "trials": rows,
        "paths": {
            "trials": join(sweep_dir, TRIALS_FILE),
            "best": join(sweep_dir, BEST_FILE),
            "plot": join(sweep_dir, PLOT_FILE),
        },
    }


def _evaluations(result: Any, metric: str, sweep_dir: str) -> tuple[str, list[int], list[float]]:
    """The trial's id, and the steps and values of the metric at each evaluation it
    reported, in step order (a step reported again, after a restart, counts once)."""
    from raygen.jobs.train.metrics import metric_rows

    rows = metric_rows(read_text(evaluations_log(sweep_dir, result.path)))
    # After PBT copies another trial into this one, its last result is the other's.
    trial_id = rows[0]["trial_id"] if rows else (result.metrics or {}).get("trial_id")
    points = {int(r["step"]): float(r[metric]) for r in rows if r.get(metric) is not None}
    steps = sorted(points)
    return trial_id or Path(result.path).name, steps, [points[s] for s in steps]


def _best_pointer(result: Any, sweep: SweepSpec) -> dict | None:
    """The pointer of the trial's checkpoint with the best metric (None: no checkpoint)."""
    try:
        checkpoint = result.get_best_checkpoint(sweep.metric, sweep.mode)
    except Exception:  # noqa: BLE001 - Ray raises when a trial reported no checkpoint
        checkpoint = None
    checkpoint = checkpoint or result.checkpoint
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return json.loads(Path(path, POINTER_FILE).read_text())


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _write_table(table: Any, uri: str) -> None:
    import pyarrow.parquet as pq

    from raygen.cluster.storage import resolve

    fs, path = resolve(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, filesystem=fs)


def _plot(curves: dict[str, tuple[list, list]], sweep: SweepSpec, uri: str) -> None:
    """The metric over training steps, one line per trial; early-stopped lines end early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for trial_id, (steps, values) in sorted(curves.items()):
        if values:
            axes.plot(steps, values, marker="o", markersize=3, label=trial_id)
    axes.set_xlabel("step")
    axes.set_ylabel(sweep.metric)
    axes.set_title(f"{sweep.name}: {sweep.metric} of every trial ({sweep.scheduler.type})")
    axes.grid(alpha=0.3)
    if len(curves) <= 12:
        axes.legend(fontsize=7)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, PLOT_FILE)
        figure.savefig(local, dpi=110, bbox_inches="tight")
        plt.close(figure)
        if is_remote(uri):
            from raygen.cluster.storage import upload_file

            upload_file(str(local), uri)
        else:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            local.replace(uri)
