"""`raygen serve` (deploy, status, shutdown, build)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from raygen import render
from raygen.commands.common import (
    AddressOption,
    OverrideOption,
    RegistryOption,
    SetOption,
    setup_logging,
    use_registry,
)


def deploy(
    spec: Annotated[Path, typer.Argument(help="Deploy spec (YAML).")],
    set_: SetOption = None,
    address: AddressOption = None,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="Leave it running on the cluster and return."),
    ] = False,
    override_audit: OverrideOption = None,
    registry_uri: RegistryOption = None,
) -> None:
    """Deploy a model behind an autoscaling HTTP API, if its audit passed; blocks until
    Ctrl-C (or --detach)."""
    from raygen.jobs.loader import load_spec
    from raygen.serving.spec import DeploySpec

    deploy_spec = load_spec(DeploySpec, spec, set_)
    setup_logging()
    use_registry(registry_uri)
    from raygen.serving.deploy import serve

    def deployed(info: dict[str, Any], gated: Any, record: str) -> None:
        render.deployment(info, gated)
        if gated.audit_override:
            render.out.print(
                f"[yellow]audit overridden[/], on the record: {gated.audit_override.record}; "
                f"deployment recorded in {record}",
                soft_wrap=True,
            )
        if detach:
            render.out.print(f"left running; stop it with `raygen serve shutdown {info['name']}`")
        else:
            render.plain("serving until Ctrl-C")

    serve(deploy_spec, str(spec), address, override_audit, detach, render.plain, deployed)


def status(address: AddressOption = None) -> None:
    """List the applications Serve runs on a cluster, with their replicas."""
    from raygen.cluster.connection import connect_existing
    from raygen.serving.deploy import status as applications

    connect_existing(address)
    render.applications(applications())


def shutdown(
    name: Annotated[str, typer.Argument(help="Application name (the deploy spec's `name`).")],
    address: AddressOption = None,
) -> None:
    """Remove a deployed application from a cluster."""
    from raygen.cluster.connection import connect_existing
    from raygen.serving.deploy import shutdown as remove

    connect_existing(address)
    remove(name)
    render.out.print(f"shut down {name}")


def promote(
    name: Annotated[str, typer.Argument(help="Application name (the deploy spec's `name`).")],
    address: AddressOption = None,
) -> None:
    """Promote an application's canary now: it answers every request, the old model is
    drained; recorded with your name and the figures so far."""
    _decide(name, "promote", address)


def rollback(
    name: Annotated[str, typer.Argument(help="Application name (the deploy spec's `name`).")],
    address: AddressOption = None,
) -> None:
    """Roll an application's canary back now: every request goes to the primary, the canary
    is drained; recorded with your name and the figures so far."""
    _decide(name, "rollback", address)


def _decide(name: str, action: str, address: str | None) -> None:
    from raygen.cluster.connection import connect_existing
    from raygen.serving.deploy import decide

    connect_existing(address)
    render.rollout_decision(name, decide(name, action))


def build(
    spec: Annotated[Path, typer.Argument(help="Deploy spec (YAML).")],
    out_path: Annotated[
        Path, typer.Option("--out", "-o", help="Serve config file to write.")
    ] = Path("serve-config.yaml"),
    set_: SetOption = None,
    address: AddressOption = None,
    override_audit: OverrideOption = None,
    registry_uri: RegistryOption = None,
) -> None:
    """Write a Ray Serve config file for `serve deploy` or a KubeRay RayService (after the
    audit gate: its replicas check the audit again when they start)."""
    from raygen.jobs.loader import load_spec
    from raygen.serving.deploy import resolve_deploy_spec, write_serve_config
    from raygen.serving.gate import gate_arms
    from raygen.serving.spec import DeploySpec

    deploy_spec = load_spec(DeploySpec, spec, set_)
    setup_logging()
    use_registry(registry_uri)
    resolved = resolve_deploy_spec(deploy_spec, str(spec), embedded=False)
    gated = gate_arms(resolved, override_audit, address, on_event=render.plain)
    write_serve_config(gated, out_path)
    if gated.audit_override:
        render.out.print(
            f"[yellow]audit overridden[/], on the record: {gated.audit_override.record}"
        )
    render.out.print(f"wrote {out_path}; deploy it with `serve deploy {out_path}`")
