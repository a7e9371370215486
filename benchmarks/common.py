"""What every benchmark shares: the machine it ran on, a results file, a printed table.

Benchmarks compare raygen with the alternative a user would pick, in the same process run,
on the same model and inputs, and report ratios: these machines are shared and noisy, so
absolute figures vary from run to run while ratios hold. They are never test assertions.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def write_results(name: str, rows: list[dict[str, Any]], notes: dict[str, Any]) -> Path:
    """Write `benchmarks/results/<name>.json`: the rows, notes and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "notes": notes,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table of `columns` (floats to 3 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for i, line in enumerate(table):
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def steady_rate(durations: list[float], units_per_step: float, skip: int) -> float:
    """Units per second over the steps after the first `skip` (warm-up), from the median
    step time (robust to a neighbour's burst on a shared machine)."""
    steady = durations[skip:]
    return units_per_step / statistics.median(steady)
