"""Early stopping: the shipped sweep with synchronous successive halving and with ASHA,
against the same sweep with FIFO (every trial runs to the end); same seed, so the same trials.

    python benchmarks/tuning.py                  # ~22 min on 2 cores
    python benchmarks/tuning.py --replay DIR     # ASHA settings replayed on a FIFO run

The replay runs ASHA's rule (a trial reaching a rung goes on only if its metric is among the
best 1/reduction_factor of those recorded at that rung so far) over the FIFO run's recorded
curves and per-evaluation times, with the same concurrency, for a grid of grace periods and
reduction factors: which settings could meet the target on this sweep, without rerunning it.

Reports wall time, trial-steps (training steps run, summed over trials) and whether each
finds FIFO's best configuration. Target: <= 50% of FIFO's trial-steps and the same best
configuration (or one within 2% of its metric)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, print_table, write_results  # noqa: E402

SWEEP = ROOT / "tuning" / "examples" / "code-lm-lr.yaml"
SCHEDULERS = ("successive_halving", "asha", "fifo")  # FIFO last: the others are against it


def replay(fifo_dir: Path, grace: int, rf: int, concurrency: int = 2) -> dict[str, Any]:
    """ASHA's decisions replayed on a FIFO sweep's recorded trials (in trial-id order)."""
    import heapq
    import json

    import numpy as np

    trials = []
    for path in sorted(fifo_dir.glob("trial_driver_*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        trials.append(([r["eval_loss"] for r in rows], [r["time_this_iter_s"] for r in rows]))
    max_t = len(trials[0][0])
    rungs = [grace * rf**k for k in range(10) if grace * rf**k < max_t]
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    events: list[tuple[float, int, int]] = []
    waiting, evaluations, final, end = list(range(len(trials))), 0, {}, 0.0

    def start(now: float) -> None:
        i = waiting.pop(0)
        heapq.heappush(events, (now + trials[i][1][0], i, 1))

    for _ in range(concurrency):
        start(0.0)
    while events:
        end, i, it = heapq.heappop(events)
        value = trials[i][0][it - 1]
        evaluations, final[i] = evaluations + 1, value
        stop = False
        if it in recorded:
            recorded[it].append(value)
            stop = value > np.percentile(recorded[it], 100 / rf)
        if stop or it == max_t:
            if waiting:
                start(end)
        else:
            heapq.heappush(events, (end + trials[i][1][it], i, it + 1))
    best = min(final, key=final.get)
    fifo_best = min(range(len(trials)), key=lambda i: trials[i][0][-1])
    return {
        "grace_period": grace,
        "reduction_factor": rf,
        "trial_steps_ratio": evaluations / (max_t * len(trials)),
        "finds_fifo_best": best == fifo_best,
        "best_metric_gap": final[best] / trials[fifo_best][0][-1] - 1,
    }


def replay_grid(fifo_dir: Path) -> list[dict[str, Any]]:
    rows = [replay(fifo_dir, g, rf) for g in (1, 2, 3, 4) for rf in (2, 3, 4)]
    print_table(
        rows,
        [
            "grace_period",
            "reduction_factor",
            "trial_steps_ratio",
            "finds_fifo_best",
            "best_metric_gap",
        ],
    )
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replay", type=Path, help="a FIFO run of the sweep: replay ASHA on it")
    args = parser.parse_args()
    if args.replay:
        replay_grid(args.replay)
        return

    import ray

    from raygen.tuning.sweep import run_sweep
    from raygen.tuning.validate import load_sweep

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    storage = tempfile.mkdtemp(prefix="bench-tune-")
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    rows = []
    for scheduler in SCHEDULERS:
        sweep, base = load_sweep(
            SWEEP,
            [f"run.storage={storage}", f"name=bench-{scheduler}", f"scheduler.type={scheduler}"],
        )
        base.setdefault("data", {})["prepared"] = str(Path(storage, "prepared"))
        eval_every = sweep.overrides["train.eval_every"]
        started = time.perf_counter()
        summary = run_sweep(sweep, base, str(SWEEP))
        wall = time.perf_counter() - started
        trials = summary["trials"]
        rows.append(
            {
                "scheduler": scheduler,
                "trials": len(trials),
                "stopped_early": sum(t["status"] == "stopped_early" for t in trials),
                "trial_steps": sum(t["iterations"] * eval_every for t in trials),
                "wall_s": wall,
                "best_trial": summary["best"]["trial_id"],
                "best_config": summary["best"]["config"],
                "best_eval_loss": summary["best"]["value"],
            }
        )
    ray.shutdown()
    fifo = rows[-1]
    for row in rows:
        row["steps_vs_fifo"] = row["trial_steps"] / fifo["trial_steps"]
        row["wall_vs_fifo"] = row["wall_s"] / fifo["wall_s"]
        row["same_best"] = row["best_config"] == fifo["best_config"]
        row["best_vs_fifo"] = row["best_eval_loss"] / fifo["best_eval_loss"] - 1
    for row in rows:
        row["best_config"] = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row["best_config"].items()
        )
    print_table(
        rows,
        [
            "scheduler",
            "trials",
            "stopped_early",
            "trial_steps",
            "steps_vs_fifo",
            "wall_s",
            "wall_vs_fifo",
            "best_config",
            "best_eval_loss",
            "same_best",
        ],
    )
    print("\nASHA replayed on the FIFO run's curves:")
    replayed = replay_grid(Path(storage, "bench-fifo"))
    for row in rows[:-1]:
        print(
            f"\n{row['scheduler']}/fifo: trial-steps {row['steps_vs_fifo']:.2f}, wall time "
            f"{row['wall_vs_fifo']:.2f}; same best configuration: {row['same_best']}; best "
            f"metric {row['best_vs_fifo']:+.1%} vs FIFO's"
        )
    path = write_results(
        "tuning",
        rows,
        {
            "sweep": str(SWEEP.relative_to(ROOT)),
            "trial_steps": "evaluations reached x eval_every, summed over trials (a paused "
            "trial's workers wait at its rung: no step runs past it)",
            "targets": {"steps_vs_fifo": 0.5, "best_vs_fifo": 0.02},
            "asha_replayed_on_fifo_curves": replayed,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
