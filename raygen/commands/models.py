"""`raygen models register|list|show`: the MLflow model registry."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import RegistryOption, setup_logging, use_registry


def register(
    run_or_model: Annotated[
        str, typer.Argument(help="A training run directory, or its model/ (local or URI).")
    ],
    name: Annotated[str, typer.Option("--name", help="Registered model name.")],
    registry_uri: RegistryOption = None,
) -> None:
    """Register an exported model as a new version of NAME (created if missing)."""
    setup_logging()
    use_registry(registry_uri)
    from raygen.jobs.registry import register_by_path

    version = register_by_path(run_or_model, name)
    render.out.print(f"registered {version.model} as [bold]{version.ref}[/]", soft_wrap=True)


def list_(
    registry_uri: RegistryOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered models and their versions, with audit and deployment state."""
    use_registry(registry_uri)
    from raygen.jobs.registry import list_models
    from raygen.jobs.registry import registry_uri as uri_of

    models = list_models(uri_of())
    if as_json:
        render.out.print_json(json.dumps(models))
    else:
        render.registered_models(models, uri_of())


def show(
    name: Annotated[str, typer.Argument(help="NAME or NAME/VERSION (or a models:/ URI).")],
    registry_uri: RegistryOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a registered model's versions (or one version) with audits and deployments."""
    use_registry(registry_uri)
    from raygen.jobs.registry import list_models, resolve_model, summary
    from raygen.jobs.registry import registry_uri as uri_of

    ref = name if name.startswith("models:/") else f"models:/{name}"
    if "/" in ref.removeprefix("models:/") or "@" in ref:
        models = [{"name": ref, "versions": [summary(resolve_model(ref))]}]
    else:
        models = [m for m in list_models(uri_of()) if m["name"] == name]
        if not models:
            raise typer.BadParameter(f"no registered model {name!r} in {uri_of()}")
    if as_json:
        render.out.print_json(json.dumps(models[0] if len(models) == 1 else models))
    else:
        render.registered_models(models, uri_of())
