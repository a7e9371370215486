"""`raygen schema KIND`: a spec's JSON Schema, for editors and validators."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from raygen import render
from raygen.commands.common import SpecKind


def spec_schema(kind: SpecKind) -> dict[str, Any]:
    """The JSON Schema of one kind of spec, titled and identified for editors."""
    from raygen.jobs.spec import TrainSpec
    from raygen.serving.spec import AuditSpec, DeploySpec
    from raygen.tuning.spec import SweepSpec

    model = {
        SpecKind.train: TrainSpec,
        SpecKind.sweep: SweepSpec,
        SpecKind.audit: AuditSpec,
        SpecKind.deploy: DeploySpec,
    }[kind]
    schema = model.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"raygen {kind.value} spec",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def schema(
    kind: Annotated[SpecKind, typer.Argument(help="Which spec.")],
) -> None:
    """Print a spec's JSON Schema (every key, its type, default and description)."""
    render.out.print_json(json.dumps(spec_schema(kind)))
