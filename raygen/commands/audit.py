"""`raygen audit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import AddressOption, SetOption, setup_logging


def audit(
    spec: Annotated[Path, typer.Argument(help="Audit spec (YAML).")],
    model: Annotated[str, typer.Option("--model", help="Exported model dir or URI to audit.")],
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Where audit.json and audit.html go. Default: <run>/audit."),
    ] = None,
    set_: SetOption = None,
    address: AddressOption = None,
) -> None:
    """Audit a model for group disparities with Fairlearn; exit 3 if a check fails."""
    from raygen.jobs.loader import load_spec
    from raygen.serving.spec import AuditSpec

    audit_spec = load_spec(AuditSpec, spec, set_)
    setup_logging()
    from raygen.serving.audit.run import raise_if_failed, run_audit

    with render.StageProgress() as progress:
        report = run_audit(audit_spec, str(spec), model, out_dir, address, on_progress=progress)
    render.audit_report(report)
    raise_if_failed(report)
