"""`raygen data prepare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import AddressOption, SetOption, setup_logging


def prepare(
    spec: Annotated[Path, typer.Argument(help="Train spec whose `data` section to prepare.")],
    set_: SetOption = None,
    address: AddressOption = None,
    force: Annotated[bool, typer.Option("--force", help="Prepare even if up to date.")] = False,
) -> None:
    """Tokenize and pack the spec's corpus into Parquet shards (as `raygen train` does)."""
    from raygen.jobs.loader import load_spec
    from raygen.jobs.spec import TrainSpec

    train_spec = load_spec(TrainSpec, spec, set_)
    setup_logging()
    from raygen.jobs.data.prepare import prepare_data
    from raygen.jobs.run_dir import prepared_dir_of
    from raygen.jobs.validate import validate_train_spec

    resolved = validate_train_spec(train_spec, str(spec))
    with render.StageProgress() as progress:
        stats = prepare_data(
            resolved, prepared_dir_of(resolved), force=force, address=address, report=progress
        )
    render.out.print_json(json.dumps(stats))
