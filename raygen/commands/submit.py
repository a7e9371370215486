"""`raygen submit` and `raygen jobs` (list, status, logs, stop): jobs on a Ray cluster
through its Jobs API."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from raygen import render
from raygen.commands.common import JobsAddressOption, SetOption


class SubmitKind(str, Enum):
    """The commands a cluster job can run."""

    train = "train"
    tune = "tune"
    audit = "audit"
    serve = "serve"


def submit(
    kind: Annotated[SubmitKind, typer.Argument(help="The command the job runs.")],
    spec: Annotated[Path, typer.Argument(help="The command's spec, inside the working dir.")],
    set_: SetOption = None,
    model: Annotated[
        str | None, typer.Option("--model", help="audit: the model to audit (on the cluster).")
    ] = None,
    address: JobsAddressOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the logs until the job ends.")
    ] = False,
    working_dir: Annotated[
        Path, typer.Option("--working-dir", help="Uploaded and run from. Default: here.")
    ] = Path("."),
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            help="Forward this environment variable to the job (repeatable). Ray stores it "
            "with the job, readable through the Jobs API: give nodes their credentials "
            "instead (instance profiles, workload identity).",
        ),
    ] = None,
) -> None:
    """Run `raygen KIND SPEC` on a Ray cluster through its Jobs API."""
    from raygen.cluster.jobs import submit as submit_job

    root = working_dir.resolve()
    command = cluster_command(kind, spec, set_ or [], model, root)
    job = submit_job(command, address, root, env, required=[command[1]])
    render.submitted(job, root)
    if not follow:
        render.plain(f"  follow it with `raygen jobs logs {job['job_id']} --follow`")
        return
    _follow(job["job_id"], address)


def cluster_command(
    kind: SubmitKind, spec: Path, overrides: list[str], model: str | None, working_dir: Path
) -> list[str]:
    """The raygen command a job runs, after checking what can be checked here: the spec
    is valid, inside the uploaded dir, and its outputs go where they outlive the job."""
    from raygen.jobs.errors import SpecError
    from raygen.jobs.loader import load_spec
    from raygen.jobs.run_dir import durable_storage_problem

    try:
        relative = spec.resolve().relative_to(working_dir)
    except ValueError:
        raise SpecError(
            str(spec),
            f"is outside the working directory {working_dir}, which is what gets uploaded; "
            "move it there or pass --working-dir.",
        ) from None
    sets = [arg for item in overrides for arg in ("--set", item)]
    storage = None
    if kind is SubmitKind.train:
        from raygen.jobs.spec import TrainSpec
        from raygen.jobs.validate import portable_problems

        train_spec = load_spec(TrainSpec, spec, overrides)
        problems = portable_problems(train_spec)
        if problems:
            raise SpecError(str(spec), problems)
        storage = train_spec.run.storage
    elif kind is SubmitKind.tune:
        from raygen.tuning.validate import load_sweep

        storage = load_sweep(spec, overrides)[0].run.storage
    elif kind is SubmitKind.audit:
        from raygen.serving.spec import AuditSpec

        load_spec(AuditSpec, spec, overrides)
        if not model:
            raise typer.BadParameter("audit needs --model: the model dir or URI to audit.")
        sets += ["--model", model]
    else:
        from raygen.serving.spec import DeploySpec

        load_spec(DeploySpec, spec, overrides)
        sets.append("--detach")  # the job deploys and ends; the app stays on the cluster
    problem = durable_storage_problem("run.storage", storage) if storage else None
    if problem:
        raise SpecError(str(spec), problem)
    return [kind.value, str(relative), *sets]


def _follow(job_id: str, address: str | None) -> None:
    from raygen.cluster.jobs import follow

    status = follow(address, job_id, render.plain)
    colour = "green" if status == "SUCCEEDED" else "red"
    render.out.print(f"job {job_id} [{colour}]{status.lower()}[/]")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


JobIdArgument = Annotated[str, typer.Argument(help="The job's id (from submit or list).")]


def jobs_list(address: JobsAddressOption = None) -> None:
    """Every job of the cluster, oldest first."""
    from raygen.cluster.jobs import list_jobs

    rows = list_jobs(address)
    if not rows:
        render.out.print("no jobs")
    for row in rows:
        render.plain(f"{row['job_id']}  {row['status']}  {row['entrypoint']}")


def jobs_status(job_id: JobIdArgument, address: JobsAddressOption = None) -> None:
    """A job's status and message; exit 1 if it failed or was stopped."""
    from raygen.cluster.jobs import job_status

    row = job_status(address, job_id)
    render.plain(f"{row['job_id']}  {row['status']}  {row['message'] or ''}")
    if row["status"] in {"FAILED", "STOPPED"}:
        raise typer.Exit(1)


def jobs_logs(
    job_id: JobIdArgument,
    address: JobsAddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
) -> None:
    """A job's output so far (or, with --follow, as it comes)."""
    from raygen.cluster.jobs import job_logs

    if follow:
        _follow(job_id, address)
        return
    render.out.print(job_logs(address, job_id), end="", highlight=False, markup=False)


def jobs_stop(job_id: JobIdArgument, address: JobsAddressOption = None) -> None:
    """Stop a running job."""
    from raygen.cluster.jobs import stop_job

    stopped = stop_job(address, job_id)
    render.out.print(f"stopping {job_id}" if stopped else f"{job_id} had already ended")
