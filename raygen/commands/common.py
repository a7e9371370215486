"""Options the commands share, and the logging every long-running command sets up."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec key: --set train.max_steps=500 (repeatable)."),
]
AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address. Default: $RAY_ADDRESS, else a local Ray."),
]
JobsAddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The cluster's Jobs API, http://HEAD:8265. Default: $RAY_API_SERVER_ADDRESS.",
    ),
]
OverrideOption = Annotated[
    str | None,
    typer.Option(
        "--override-audit",
        help="Deploy although the audit failed (or is missing or of another model); the "
        "reason, your user name and the failing checks are recorded.",
    ),
]
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Cluster launcher config (YAML).")
]


class SpecKind(str, Enum):
    """The spec files raygen reads."""

    train = "train"
    sweep = "sweep"
    audit = "audit"
    deploy = "deploy"


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("raygen").setLevel(logging.INFO)


RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry-uri",
        envvar="MLFLOW_REGISTRY_URI",
        help="The MLflow store of registered models (models:/...). Default: "
        "$MLFLOW_TRACKING_URI, else the embedded store runs/mlflow.db.",
    ),
]


def use_registry(uri: str | None) -> None:
    """Make `uri` the registry every models:/ URI of this command resolves in."""
    import os

    if uri:
        os.environ["MLFLOW_REGISTRY_URI"] = uri
