"""Run every CPU benchmark, one after another (`make bench`); the GPU one runs only where
a CUDA GPU is present. Each prints its table and writes benchmarks/results/<name>.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU = [
    "train_overhead.py",
    "zero_memory.py",
    "data_prep.py",
    "serving.py",
    "tuning.py",
    "storage.py",
]


def main() -> None:
    import torch

    scripts = CPU + (["gpu_mfu.py"] if torch.cuda.is_available() else [])
    failed = []
    for script in scripts:
        print(f"\n=== {script} ===", flush=True)
        if subprocess.call([sys.executable, str(HERE / script)]) != 0:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
