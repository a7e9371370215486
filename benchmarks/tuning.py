"""Early stopping: the shipped ASHA sweep against the same sweep with FIFO (every trial runs
to the end), same seed and so the same trials.

    python benchmarks/tuning.py     # ~10 min on 2 cores

Reports wall time, trial-steps (training steps run, summed over trials) and whether both
find the same best configuration. Target: ASHA uses <= 50% of FIFO's trial-steps and finds
the same best configuration (or one within 2% of its metric).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, print_table, write_results  # noqa: E402

SWEEP = ROOT / "tuning" / "examples" / "code-lm-lr.yaml"


def main() -> None:
    import ray

    from tuning.sweep import load_sweep, run_sweep

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    storage = tempfile.mkdtemp(prefix="bench-tune-")
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    rows = []
    for scheduler in ("asha", "fifo"):
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
    asha, fifo = rows
    steps_ratio = asha["trial_steps"] / fifo["trial_steps"]
    same_best = asha["best_config"] == fifo["best_config"]
    metric_gap = asha["best_eval_loss"] / fifo["best_eval_loss"] - 1
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
            "wall_s",
            "best_config",
            "best_eval_loss",
        ],
    )
    wall_ratio = asha["wall_s"] / fifo["wall_s"]
    print(
        f"\nASHA/FIFO: trial-steps {steps_ratio:.2f}, wall time {wall_ratio:.2f}; same best "
        f"configuration: {same_best}; ASHA's best metric {metric_gap:+.1%} vs FIFO's"
    )
    path = write_results(
        "tuning",
        rows,
        {
            "sweep": str(SWEEP.relative_to(ROOT)),
            "trial_steps_ratio": steps_ratio,
            "wall_time_ratio": wall_ratio,
            "same_best_config": same_best,
            "best_metric_gap": metric_gap,
            "targets": {"trial_steps_ratio": 0.5, "best_metric_gap": 0.02},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
