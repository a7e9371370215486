"""`raygen lineage`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import RegistryOption, use_registry


def lineage(
    model: Annotated[
        str,
        typer.Argument(help="A model directory or URI (<run>/model), or models:/NAME/VERSION."),
    ],
    registry_uri: RegistryOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the chain that produced a model, from input files to deployments, each link
    checked against today: what no longer matches is flagged."""
    use_registry(registry_uri)
    from raygen.serving.lineage import lineage as trace

    chain = trace(model)
    if as_json:
        render.out.print_json(json.dumps(chain))
    else:
        render.lineage(chain)
