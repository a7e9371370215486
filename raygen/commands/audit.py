"""`raygen audit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import (
    AddressOption,
    RegistryOption,
    SetOption,
    setup_logging,
    use_registry,
)


def audit(
    spec: Annotated[Path, typer.Argument(help="Audit spec (YAML).")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Exported model dir or URI to audit, or a registered version "
            "(models:/NAME/VERSION, models:/NAME@ALIAS): the audit is recorded on it.",
        ),
    ],
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Where audit.json and audit.html go. Default: <run>/audit."),
    ] = None,
    set_: SetOption = None,
    address: AddressOption = None,
    registry_uri: RegistryOption = None,
) -> None:
    """Audit a model for group disparities with Fairlearn; exit 3 if a check fails."""
    from raygen.jobs.loader import load_spec
    from raygen.serving.spec import AuditSpec

    audit_spec = load_spec(AuditSpec, spec, set_)
    setup_logging()
    use_registry(registry_uri)
    from raygen.serving.audit.run import raise_if_failed, run_audit

    with render.StageProgress() as progress:
        report = run_audit(audit_spec, str(spec), model, out_dir, address, on_progress=progress)
    render.audit_report(report)
    for ref in report.get("registered") or []:
        render.out.print(f"  recorded on {ref}")
    raise_if_failed(report)
