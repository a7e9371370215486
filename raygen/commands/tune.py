"""`raygen tune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import AddressOption, SetOption, setup_logging


def tune(
    sweep: Annotated[Path, typer.Argument(help="Sweep spec (YAML).")],
    set_: SetOption = None,
    address: AddressOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted sweep from its storage.")
    ] = False,
    export_best: Annotated[
        str | None,
        typer.Option("--export-best", help="Export the best trial's best checkpoint here."),
    ] = None,
) -> None:
    """Search hyperparameters: every trial is a training run; bad ones stop early."""
    setup_logging()
    from raygen.tuning.sweep import run_sweep
    from raygen.tuning.validate import load_sweep

    spec, base_raw = load_sweep(sweep, set_)
    with render.SweepProgress() as progress:
        summary = run_sweep(
            spec,
            base_raw,
            str(sweep),
            address=address,
            resume=resume,
            on_progress=progress.line,
            on_trials=progress.trials,
            on_data=progress.stages,
        )
    render.trials(summary, spec.metric)
    if export_best:
        from raygen.jobs.export import export_checkpoint

        best = summary["best"]
        export_checkpoint(best["run_dir"], best["checkpoint"], export_best)
        render.out.print(f"exported the best checkpoint to {export_best}")
