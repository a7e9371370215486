"""The `raygen` console script: the command groups wired together, and raygen's own
errors turned into a one-line message and an exit code (never a traceback).

The commands live in `raygen.commands` (one module per group) and print through
`raygen.render`. Importing this module loads no torch, Ray or DeepSpeed: each command
imports what it needs when it runs, so `--help`, `--check` and `submit` start fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from raygen import __version__, render
from raygen.cluster.errors import RaygenError
from raygen.commands import (
    audit,
    cluster,
    data,
    k8s,
    lineage,
    models,
    schema,
    serve,
    submit,
    train,
    tune,
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print raygen's own errors as a short message and exit with their code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RaygenError as exc:
            render.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            render.err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _group(help: str, **kwargs: Any) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, **kwargs)


def _command(group: typer.Typer, fn: Callable[..., Any], name: str | None = None) -> None:
    group.command(name)(user_errors(fn))


def _version(value: bool) -> None:
    if value:
        render.out.print(f"raygen {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="raygen",
    help="Train, tune, audit and serve generative models on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Train, tune, audit and serve generative models on Ray."""


_command(app, train.train, "train")
_command(app, tune.tune, "tune")
_command(app, train.export, "export")
_command(app, train.sample, "sample")
_command(app, train.generate, "generate")
_command(app, audit.audit, "audit")
_command(app, submit.submit, "submit")
_command(app, schema.schema, "schema")
_command(app, lineage.lineage, "lineage")

data_app = _group("Prepare training data.")
_command(data_app, data.prepare, "prepare")
app.add_typer(data_app, name="data")

models_app = _group("The model registry (MLflow): register models, list and show versions.")
_command(models_app, models.register, "register")
_command(models_app, models.list_, "list")
_command(models_app, models.show, "show")
app.add_typer(models_app, name="models")


class _DeployByDefault(TyperGroup):
    """`raygen serve SPEC` means `raygen serve deploy SPEC`; `status`, `shutdown`, `build`,
    `promote` and `rollback` are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["deploy", *args]
        return super().parse_args(ctx, args)


serve_app = _group(
    "Serve a trained model on Ray Serve: `raygen serve SPEC` deploys it.", cls=_DeployByDefault
)
for _name in ("deploy", "status", "shutdown", "build", "promote", "rollback"):
    _command(serve_app, getattr(serve, _name), _name)
app.add_typer(serve_app, name="serve")

jobs_app = _group("Jobs on a Ray cluster (submitted with `raygen submit`).")
for _name in ("list", "status", "logs", "stop"):
    _command(jobs_app, getattr(submit, f"jobs_{_name}"), _name)
app.add_typer(jobs_app, name="jobs")

cluster_app = _group(
    "Ray clusters: validate configs, start and stop them on a cloud, simulate autoscaling."
)
for _name in ("validate", "up", "down", "status", "attach", "dashboard", "simulate"):
    _command(cluster_app, getattr(cluster, _name), _name)
app.add_typer(cluster_app, name="cluster")

k8s_app = _group("Kubernetes: KubeRay manifests for runs, sweeps, deployments and clusters.")
_command(k8s_app, k8s.render_manifests, "render")
app.add_typer(k8s_app, name="k8s")


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
