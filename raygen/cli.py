"""The `raygen` console script: each subcommand parses arguments and calls one domain function.

Kept cheap to import: torch, Ray and DeepSpeed load only inside the commands that need them.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from cluster.errors import RaygenError

app = typer.Typer(
    name="raygen",
    help="Train, tune, audit and serve generative models on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


class _DeployByDefault(TyperGroup):
    """`raygen serve SPEC` means `raygen serve deploy SPEC`; `status`, `shutdown` and
    `build` are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["deploy", *args]
        return super().parse_args(ctx, args)


serve_app = typer.Typer(
    cls=_DeployByDefault,
    help="Serve a trained model on Ray Serve: `raygen serve SPEC` deploys it.",
    no_args_is_help=True,
)
app.add_typer(serve_app, name="serve")

out = Console()
err = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec key: --set train.max_steps=500 (repeatable)."),
]
OverrideOption = Annotated[
    str | None,
    typer.Option(
        "--override-audit",
        help="Deploy although the audit failed (or is missing or of another model); the "
        "reason, your user name and the failing checks are recorded.",
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address. Default: $RAY_ADDRESS, else a local Ray."),
]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print raygen's own errors as a short message and exit with their code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RaygenError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("jobs", "cluster", "raygen"):
        logging.getLogger(name).setLevel(logging.INFO)


@app.command()
@user_errors
def train(
    spec: Annotated[Path | None, typer.Argument(help="Train spec (YAML).")] = None,
    set_: SetOption = None,
    address: AddressOption = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over in a new run dir <name>-<k>.")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Validate and print the resolved spec; run nothing.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the workers' own logs too.")
    ] = False,
    print_schema: Annotated[
        bool, typer.Option("--print-schema", help="Print the train spec's JSON Schema and exit.")
    ] = False,
) -> None:
    """Train a model from a spec with DeepSpeed on Ray Train."""
    from jobs.loader import dump_spec, load_spec
    from jobs.spec import TrainSpec

    if print_schema:
        out.print_json(json.dumps(TrainSpec.model_json_schema()))
        return
    if spec is None:
        raise typer.BadParameter("give a train spec, e.g. jobs/examples/code-lm-tiny.yaml")
    train_spec = load_spec(TrainSpec, spec, set_)
    _setup_logging()
    from jobs.launch import launch, validate_train_spec

    if check:
        resolved = validate_train_spec(train_spec, str(spec))
        out.print(dump_spec(resolved), end="", highlight=False)
        err.print(f"{spec}: valid")
        return
    result = launch(
        train_spec,
        str(spec),
        address=address,
        fresh=fresh,
        on_metrics=_print_row,
        verbose=verbose,
    )
    _print_summary(result)


@data_app.command("prepare")
@user_errors
def data_prepare(
    spec: Annotated[Path, typer.Argument(help="Train spec whose `data` section to prepare.")],
    set_: SetOption = None,
    address: AddressOption = None,
    force: Annotated[bool, typer.Option("--force", help="Prepare even if up to date.")] = False,
) -> None:
    """Tokenize and pack the spec's corpus into Parquet shards (as `raygen train` does)."""
    from jobs.loader import load_spec
    from jobs.spec import TrainSpec

    train_spec = load_spec(TrainSpec, spec, set_)
    _setup_logging()
    from jobs.data import prepare_data
    from jobs.launch import prepared_dir_of, validate_train_spec

    resolved = validate_train_spec(train_spec, str(spec))
    stats = prepare_data(resolved, prepared_dir_of(resolved), force=force, address=address)
    out.print_json(json.dumps(stats))


@app.command()
@user_errors
def tune(
    sweep: Annotated[Path, typer.Argument(help="Sweep spec (YAML).")],
    set_: SetOption = None,
    address: AddressOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted sweep from its storage.")
    ] = False,
    export_best: Annotated[
        str | None,
        typer.Option("--export-best", help="Export the best trial's best checkpoint here."),
    ] = None,
) -> None:
    """Search hyperparameters: every trial is a training run; bad ones stop early."""
    _setup_logging()
    from tuning.sweep import load_sweep, run_sweep

    spec, base_raw = load_sweep(sweep, set_)
    summary = run_sweep(
        spec, base_raw, str(sweep), address=address, resume=resume, on_progress=out.print
    )
    _print_trials(summary, spec.metric)
    if export_best:
        from jobs.export import export_checkpoint

        best = summary["best"]
        export_checkpoint(best["run_dir"], best["checkpoint"], export_best)
        out.print(f"exported the best checkpoint to {export_best}")


@app.command("export")
@user_errors
def export(
    run_dir: Annotated[str, typer.Argument(help="A training run directory (or s3:// URI).")],
    out_dir: Annotated[str, typer.Option("--out", help="Model directory to write.")],
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="Checkpoint dir to export. Default: the run's last."),
    ] = None,
) -> None:
    """Export a checkpoint of a run as a model directory, as training does at its end."""
    from jobs.export import export_checkpoint
    from jobs.launch import read_result

    if checkpoint is None:
        result = read_result(run_dir) or {}
        checkpoint = (result.get("paths") or {}).get("checkpoint")
        if not checkpoint:
            raise typer.BadParameter(f"{run_dir} has no finished checkpoint; give --checkpoint.")
    export_checkpoint(run_dir, checkpoint, out_dir)
    out.print(f"exported {checkpoint} to {out_dir}")


def _print_trials(summary: dict[str, Any], metric: str) -> None:
    from rich.table import Table

    trials = summary["trials"]
    table = Table(title=f"{len(trials)} trials")
    searched = [k for k in trials[0] if k.startswith("config.")] if trials else []
    for column in ["trial_id", "status", "iterations", f"best_{metric}", *searched]:
        table.add_column(column.removeprefix("config."))
    for row in trials:
        cells = [row["trial_id"], row["status"], str(row["iterations"])]
        for key in [f"best_{metric}", *searched]:
            value = row[key]
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row(*cells)
    out.print(table)
    best = summary["best"]
    out.print(
        f"[green]best[/]: trial {best['trial_id']} {metric} {best['value']:.4f} "
        f"({', '.join(f'{k}={v}' for k, v in best['config'].items())})"
    )
    for name, path in summary["paths"].items():
        out.print(f"  {name:<7} {path}", soft_wrap=True)


@app.command()
@user_errors
def sample(
    model_dir: Annotated[str, typer.Argument(help="A diffusion run's model/ dir (or s3:// URI).")],
    n: Annotated[int, typer.Option("--n", min=1, max=4096, help="Images to generate.")] = 16,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")] = 50,
    class_label: Annotated[
        int | None,
        typer.Option("--class-label", help="Class of every image (conditional models)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the starting noise.")] = 0,
    scheduler: Annotated[
        str | None,
        typer.Option("--scheduler", help="ddpm or ddim; default: the one saved with the model."),
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", help="PNG grid to write.")] = Path(
        "samples.png"
    ),
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Also write each image as a PNG here.")
    ] = None,
) -> None:
    """Generate images with a trained diffusion model and write them as a PNG grid."""
    if scheduler not in (None, "ddpm", "ddim"):
        raise typer.BadParameter(f"--scheduler must be ddpm or ddim, not {scheduler!r}")
    from jobs.models.diffusion import image_grid, save_png
    from jobs.sampling import sample_model

    images, labels = sample_model(model_dir, n, steps, class_label, seed, scheduler)
    columns = max(labels) + 1 if labels and class_label is None else min(8, n)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(images, columns), out_path, scale=max(1, 512 // (columns * 20)))
    out.print(f"wrote {n} samples to {out_path}")
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            suffix = f"_class{labels[i]}" if labels else ""
            save_png(image, out_dir / f"sample_{i:04d}{suffix}.png")
        out.print(f"wrote {n} PNGs to {out_dir}")


@app.command()
@user_errors
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
    from jobs.loader import load_spec
    from serving.spec import AuditSpec

    audit_spec = load_spec(AuditSpec, spec, set_)
    _setup_logging()
    from serving.audit import raise_if_failed, run_audit

    report = run_audit(audit_spec, str(spec), model, out_dir, address)
    _print_audit(report)
    raise_if_failed(report)


def _interval(check: dict[str, Any], figure: str) -> str:
    """` [low, high]`: a figure's confidence interval, when the audit has one."""
    span = (check.get("intervals") or {}).get(figure)
    return f" [{span[0]:.3g}, {span[1]:.3g}]" if span else ""


def _print_audit(report: dict[str, Any]) -> None:
    for check in report["checks"]:
        mark = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]"
        groups = ", ".join(
            f"{g} {v:.4g} (n={check['counts'].get(g, 0)})" for g, v in check["by_group"].items()
        )
        out.print(
            f"{mark} {check['metric']} by {check['feature']}: {groups}; ratio "
            f"{check['ratio']:.3f}{_interval(check, 'ratio')}, difference "
            f"{check['difference']:.4g}{_interval(check, 'difference')}",
            highlight=False,
            soft_wrap=True,
        )
        for reason in check["reasons"]:
            out.print(f"     {reason}", highlight=False, soft_wrap=True)
    verdict = "[green]passed[/]" if report["passed"] else "[red]failed[/]"
    out.print(f"audit {report['name']} {verdict} in {report['duration_s']:.0f} s")
    out.print(f"  report  {report['paths']['report']}", soft_wrap=True)
    out.print(f"  audit   {report['paths']['audit']}", soft_wrap=True)


@serve_app.command("deploy")
@user_errors
def serve_deploy(
    spec: Annotated[Path, typer.Argument(help="Deploy spec (YAML).")],
    set_: SetOption = None,
    address: AddressOption = None,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="Leave it running on the cluster and return."),
    ] = False,
    override_audit: OverrideOption = None,
) -> None:
    """Deploy a model behind an autoscaling HTTP API, if its audit passed; blocks until
    Ctrl-C (or --detach)."""
    import os

    from jobs.loader import load_spec
    from serving.spec import DeploySpec

    deploy_spec = load_spec(DeploySpec, spec, set_)
    _setup_logging()
    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    if detach and embedded:
        raise typer.BadParameter(
            "--detach needs a running Ray cluster to leave the app on: give --address (or "
            "RAY_ADDRESS), e.g. after `ray start --head`; without --detach, raygen serves "
            "on a local Ray until Ctrl-C."
        )
    import signal

    from cluster.connection import connect
    from serving.deploy import block, deploy, gate, resolve_deploy_spec, teardown
    from serving.gate import record_deployment

    resolved = resolve_deploy_spec(deploy_spec, str(spec), embedded=embedded)
    connect(address)
    # SIGTERM (containers, process managers) tears down like Ctrl-C does; set after
    # connecting, as Ray installs a SIGTERM handler of its own there.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    gated = gate(resolved, override_audit, address, on_event=_print_plain)
    try:
        info = deploy(gated, embedded=embedded)
        record = record_deployment(gated, info)
        _print_deployment(info, gated)
        if gated.audit_override:
            out.print(
                f"[yellow]audit overridden[/], on the record: {gated.audit_override.record}; "
                f"deployment recorded in {record}",
                soft_wrap=True,
            )
        if detach:
            out.print(f"left running; stop it with `raygen serve shutdown {info['name']}`")
            return
        out.print("serving until Ctrl-C", highlight=False)
        block(gated, _print_plain)
    except KeyboardInterrupt:
        out.print(f"shutting down {gated.name}")
        teardown(gated.name, embedded)
        raise


@serve_app.command("status")
@user_errors
def serve_status(address: AddressOption = None) -> None:
    """List the applications Serve runs on a cluster, with their replicas."""
    from cluster.connection import connect_existing
    from serving.deploy import status

    connect_existing(address)
    rows = status()
    if not rows:
        out.print("no applications are running")
    for row in rows:
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in row["replicas"].items())
        out.print(
            f"{row['name']}  {row['status']}  replicas: {replicas or '0'}  "
            f"deployed {row['deployed']}" + (f"  ({row['message']})" if row["message"] else ""),
            highlight=False,
            soft_wrap=True,
        )


@serve_app.command("shutdown")
@user_errors
def serve_shutdown(
    name: Annotated[str, typer.Argument(help="Application name (the deploy spec's `name`).")],
    address: AddressOption = None,
) -> None:
    """Remove a deployed application from a cluster."""
    from cluster.connection import connect_existing
    from serving.deploy import shutdown

    connect_existing(address)
    shutdown(name)
    out.print(f"shut down {name}")


@serve_app.command("build")
@user_errors
def serve_build(
    spec: Annotated[Path, typer.Argument(help="Deploy spec (YAML).")],
    out_path: Annotated[
        Path, typer.Option("--out", "-o", help="Serve config file to write.")
    ] = Path("serve-config.yaml"),
    set_: SetOption = None,
    address: AddressOption = None,
    override_audit: OverrideOption = None,
) -> None:
    """Write a Ray Serve config file for `serve deploy` or a KubeRay RayService (after the
    audit gate: its replicas check the audit again when they start)."""
    from jobs.loader import load_spec
    from serving.deploy import gate, resolve_deploy_spec, write_serve_config
    from serving.spec import DeploySpec

    deploy_spec = load_spec(DeploySpec, spec, set_)
    _setup_logging()
    resolved = resolve_deploy_spec(deploy_spec, str(spec), embedded=False)
    gated = gate(resolved, override_audit, address, on_event=_print_plain)
    write_serve_config(gated, out_path)
    if gated.audit_override:
        out.print(f"[yellow]audit overridden[/], on the record: {gated.audit_override.record}")
    out.print(f"wrote {out_path}; deploy it with `serve deploy {out_path}`")


SUBMIT_KINDS = ("train", "tune", "audit", "serve")
JobsAddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The cluster's Jobs API, http://HEAD:8265. Default: $RAY_API_SERVER_ADDRESS.",
    ),
]


@app.command()
@user_errors
def submit(
    kind: Annotated[str, typer.Argument(help="What to run: train, tune, audit or serve.")],
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
    from cluster.jobs import submit as submit_job

    command = _cluster_command(kind, spec, set_ or [], model, working_dir.resolve())
    job = submit_job(command, address, working_dir.resolve(), env, required=[command[1]])
    out.print(f"submitted {job['job_id']}: {job['entrypoint']}", highlight=False, soft_wrap=True)
    out.print(
        f"  uploaded {job['upload_bytes'] / 2**20:.1f} MiB from {working_dir.resolve()}; "
        f"environment forwarded: {', '.join(job['env']) or 'none'}",
        highlight=False,
        soft_wrap=True,
    )
    if not follow:
        out.print(f"  follow it with `raygen jobs logs {job['job_id']} --follow`", highlight=False)
        return
    _follow(job["job_id"], address)


def _cluster_command(
    kind: str, spec: Path, overrides: list[str], model: str | None, working_dir: Path
) -> list[str]:
    """The raygen command a job runs, after checking what can be checked here: the spec
    is valid, inside the uploaded dir, and its outputs go where they outlive the job."""
    from jobs.errors import SpecError
    from jobs.loader import load_spec

    if kind not in SUBMIT_KINDS:
        raise typer.BadParameter(f"KIND is {kind!r}; one of {', '.join(SUBMIT_KINDS)}.")
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
    if kind == "train":
        from jobs.launch import portable_problems
        from jobs.spec import TrainSpec

        train_spec = load_spec(TrainSpec, spec, overrides)
        problems = portable_problems(train_spec)
        if problems:
            raise SpecError(str(spec), problems)
        storage = ("run.storage", train_spec.run.storage)
    elif kind == "tune":
        from tuning.sweep import load_sweep

        storage = ("run.storage", load_sweep(spec, overrides)[0].run.storage)
    elif kind == "audit":
        from serving.spec import AuditSpec

        load_spec(AuditSpec, spec, overrides)
        if not model:
            raise typer.BadParameter("audit needs --model: the model dir or URI to audit.")
        sets += ["--model", model]
    else:
        from serving.spec import DeploySpec

        load_spec(DeploySpec, spec, overrides)
        sets.append("--detach")  # the job deploys and ends; the app stays on the cluster
    if storage and not ("://" in storage[1] or Path(storage[1]).is_absolute()):
        raise SpecError(
            str(spec),
            f"`{storage[0]}`: {storage[1]!r} is relative: on the cluster it would be inside "
            "the job's temporary copy of the working directory, and lost. Give storage every "
            f"node and you can reach: --set {storage[0]}=s3://BUCKET/runs (or an absolute "
            "path on a shared filesystem).",
        )
    return [kind, str(relative), *sets]


def _follow(job_id: str, address: str | None) -> None:
    from cluster.jobs import follow

    status = follow(address, job_id, _print_plain)
    colour = "green" if status == "SUCCEEDED" else "red"
    out.print(f"job {job_id} [{colour}]{status.lower()}[/]")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


jobs_app = typer.Typer(help="Jobs on a Ray cluster (submitted with `raygen submit`).")
app.add_typer(jobs_app, name="jobs")
JobIdArgument = Annotated[str, typer.Argument(help="The job's id (from submit or list).")]


@jobs_app.command("list")
@user_errors
def jobs_list(address: JobsAddressOption = None) -> None:
    """Every job of the cluster, oldest first."""
    from cluster.jobs import list_jobs

    rows = list_jobs(address)
    if not rows:
        out.print("no jobs")
    for row in rows:
        out.print(f"{row['job_id']}  {row['status']}  {row['entrypoint']}", highlight=False)


@jobs_app.command("status")
@user_errors
def jobs_status(job_id: JobIdArgument, address: JobsAddressOption = None) -> None:
    """A job's status and message; exit 1 if it failed or was stopped."""
    from cluster.jobs import job_status

    row = job_status(address, job_id)
    out.print(f"{row['job_id']}  {row['status']}  {row['message'] or ''}", highlight=False)
    if row["status"] in {"FAILED", "STOPPED"}:
        raise typer.Exit(1)


@jobs_app.command("logs")
@user_errors
def jobs_logs(
    job_id: JobIdArgument,
    address: JobsAddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
) -> None:
    """A job's output so far (or, with --follow, as it comes)."""
    from cluster.jobs import job_logs

    if follow:
        _follow(job_id, address)
        return
    out.print(job_logs(address, job_id), end="", highlight=False, markup=False)


@jobs_app.command("stop")
@user_errors
def jobs_stop(job_id: JobIdArgument, address: JobsAddressOption = None) -> None:
    """Stop a running job."""
    from cluster.jobs import stop_job

    stopped = stop_job(address, job_id)
    out.print(f"stopping {job_id}" if stopped else f"{job_id} had already ended")


cluster_app = typer.Typer(
    help="Ray clusters: validate configs, start and stop them on a cloud, simulate autoscaling.",
    no_args_is_help=True,
)
app.add_typer(cluster_app, name="cluster")
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Cluster launcher config (YAML).")
]
SHIPPED_CLUSTER_CONFIGS = (
    "ray-cluster.yaml",
    "cluster/clouds/gcp.yaml",
    "cluster/clouds/azure.yaml",
)


@cluster_app.command("validate")
@user_errors
def cluster_validate(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Cluster configs. Default: raygen's (AWS, GCP, Azure)."),
    ] = None,
    spec: Annotated[
        list[Path] | None,
        typer.Option(
            "--spec", help="Train specs the cluster must fit. Default: jobs/examples/*.yaml."
        ),
    ] = None,
) -> None:
    """Check cluster configs against Ray's schema and raygen's rules; exit 2 if any fails."""
    from cluster.configs import config_problems, load_cluster_config
    from cluster.errors import ClusterError

    files = files or [Path(f) for f in SHIPPED_CLUSTER_CONFIGS]
    shapes = _job_shapes(spec or sorted(Path("jobs/examples").glob("*.yaml")))
    failed = []
    for path in files:
        try:
            problems = config_problems(load_cluster_config(path), shapes)
        except ClusterError as exc:
            problems = [str(exc)]
        if problems:
            failed.append(str(path))
            err.print(f"[red]{path}[/]:", highlight=False)
            for problem in problems:
                err.print(f"  - {problem}", highlight=False, markup=False, soft_wrap=True)
        else:
            out.print(f"{path}: valid (fits {len(shapes)} job specs)", highlight=False)
    if failed:
        raise ClusterError(f"{len(failed)} of {len(files)} cluster configs are invalid.")


def _job_shapes(paths: list[Path]) -> list[Any]:
    """What each train spec asks a cluster for."""
    from cluster.configs import JobShape
    from jobs.loader import load_spec
    from jobs.spec import TrainSpec

    shapes = []
    for path in paths:
        scaling = load_spec(TrainSpec, path).scaling
        per_worker = dict(scaling.resources_per_worker or {"CPU": 1})
        if scaling.use_gpu:
            per_worker.setdefault("GPU", 1)
        shapes.append(JobShape(str(path), scaling.num_workers, per_worker))
    return shapes


@cluster_app.command("up")
@user_errors
def cluster_up(
    config: ConfigOption = Path("ray-cluster.yaml"),
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
    no_restart: Annotated[
        bool, typer.Option("--no-restart", help="Update files and setup without restarting Ray.")
    ] = False,
) -> None:
    """Create or update the cluster on its cloud (Ray's `ray up`), after checking the config,
    the cloud's credentials and the cluster token."""
    from cluster.launcher import up

    raise typer.Exit(up(config, yes, no_restart))


@cluster_app.command("down")
@user_errors
def cluster_down(
    config: ConfigOption = Path("ray-cluster.yaml"),
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
) -> None:
    """Terminate every node of the cluster (Ray's `ray down`)."""
    from cluster.launcher import down

    raise typer.Exit(down(config, yes))


@cluster_app.command("status")
@user_errors
def cluster_status(config: ConfigOption = Path("ray-cluster.yaml")) -> None:
    """The head's address, the nodes and the autoscaler's view (`ray status` on the head)."""
    from cluster.launcher import status

    head, code = status(config)
    out.print(f"head node: {head}  (dashboard: `raygen cluster dashboard --config {config}`)")
    raise typer.Exit(code)


@cluster_app.command("attach")
@user_errors
def cluster_attach(config: ConfigOption = Path("ray-cluster.yaml")) -> None:
    """Open a shell on the head node (Ray's `ray attach`)."""
    from cluster.launcher import attach

    raise typer.Exit(attach(config))


@cluster_app.command("dashboard")
@user_errors
def cluster_dashboard(
    config: ConfigOption = Path("ray-cluster.yaml"),
    port: Annotated[int, typer.Option("--port", help="Local port of the tunnel.")] = 8265,
) -> None:
    """Tunnel the head's dashboard and Jobs API to http://127.0.0.1:PORT over SSH."""
    from cluster.launcher import dashboard

    out.print(f"dashboard and Jobs API on http://127.0.0.1:{port} until Ctrl-C")
    raise typer.Exit(dashboard(config, port))


@cluster_app.command("simulate")
@user_errors
def cluster_simulate(
    config: ConfigOption = Path("ray-cluster.yaml"),
    idle_timeout_minutes: Annotated[
        float | None,
        typer.Option("--idle-timeout-minutes", help="Override the config's idle timeout."),
    ] = None,
    cpus_per_node: Annotated[
        int | None,
        typer.Option("--cpus-per-node", help="CPUs of each simulated node. Default: half of here."),
    ] = None,
) -> None:
    """Run the config's autoscaling on this machine (Ray's fake multi-node provider) until
    Ctrl-C: submit jobs to it and watch worker nodes come and go."""
    from cluster import simulate
    from cluster.launcher import checked_config

    fake, rows = simulate.simulation_config(
        checked_config(config), idle_timeout_minutes, cpus_per_node
    )
    cluster = simulate.start(fake)
    out.print(f"simulated {config} on this machine (head: 0 CPUs):", highlight=False)
    for row in rows:
        _print_plain(
            f"  {row['type']}: {row['cloud']} -> {row['simulated']}, "
            f"{row['min_workers']}-{row['max_workers']} nodes"
        )
    _print_plain(
        f"idle timeout {fake['idle_timeout_minutes']} min. Submit with "
        f"`raygen submit train SPEC --address {cluster['dashboard']}`; Ctrl-C stops it all."
    )

    def report(nodes: list | None, error: str | None) -> None:
        import time

        stamp = time.strftime("%H:%M:%S")
        if nodes is None:
            err.print(f"{stamp}  cannot reach the head: {error}", highlight=False, markup=False)
        else:
            out.print(f"{stamp}  worker nodes: {len(nodes)}", highlight=False)

    try:
        simulate.watch(cluster["dashboard"], report)
    except KeyboardInterrupt:
        out.print("stopping the simulated cluster")
        simulate.stop()


def _print_plain(line: str) -> None:
    out.print(line, highlight=False, soft_wrap=True)


def _print_deployment(info: dict[str, Any], spec: Any) -> None:
    url = info["url"]
    out.print(
        f"[green]deployed[/] {info['name']} ({info['kind']}) in {info['deploy_s']:.0f} s at {url}",
        soft_wrap=True,
    )
    endpoint = "/v1/completions" if info["kind"] == "language-model" else "/v1/images/generations"
    out.print(f"  {endpoint:<24} POST   API docs: {url}/docs", highlight=False)
    scaling = spec.autoscaling
    out.print(
        f"  replicas {scaling.min_replicas}..{scaling.max_replicas}"
        + (
            " (scales to zero: the first request waits for a cold start)"
            if not scaling.min_replicas
            else ""
        ),
        highlight=False,
    )


def _print_row(row: dict[str, Any]) -> None:
    from jobs import metrics as m

    parts = [f"step {row[m.STEP]:>6}"]
    if m.TRAIN_LOSS in row:
        parts.append(f"loss {row[m.TRAIN_LOSS]:.4f}")
        parts.append(f"lr {row[m.LR]:.2e}")
        if m.TOKENS_PER_S in row:
            parts.append(f"{row[m.TOKENS_PER_S]:,.0f} tok/s")
        else:
            parts.append(f"{row[m.SAMPLES_PER_S]:,.1f} samples/s")
        parts.append(f"{row[m.STEP_TIME_S]:.3f} s/step")
    if m.EVAL_LOSS in row:
        evaluation = f"eval_loss {row[m.EVAL_LOSS]:.4f}"
        if m.PERPLEXITY in row:
            evaluation += f" ppl {row[m.PERPLEXITY]:.1f}"
        if m.FID in row:
            evaluation += f" fid({row[m.FID_EXTRACTOR]}) {row[m.FID]:.2f}"
        parts.append(f"[cyan]{evaluation}[/]")
    out.print("  ".join(parts), highlight=False, soft_wrap=True)


def _print_summary(result: dict[str, Any]) -> None:
    metrics = result.get("final_metrics", {})
    paths = result["paths"]
    if result.get("up_to_date"):
        out.print(
            f"[green]{result['name']} is already trained to step {result['final_step']}[/] "
            "(raise train.max_steps with --set to continue, or --fresh to start over)."
        )
    else:
        attempts = result.get("attempts", [])
        restarts = max(0, len([a for a in attempts if a["previous_error"]]))
        out.print(
            f"[green]done[/]: {result['name']} reached step {result['final_step']} in "
            f"{result['wall_time_s']:.0f} s"
            + (f" after {restarts} recovered failure(s)" if restarts else "")
        )
    for key in ("train_loss", "eval_loss", "perplexity", "fid"):
        if key in metrics:
            out.print(f"  {key:<11} {metrics[key]:.4f}")
    if paths.get("samples"):
        out.print(f"  samples     {paths['samples']}")
    out.print(f"  model       {paths['model']}")
    out.print(
        f"  run         {paths['run_dir']}  (metrics.jsonl, tensorboard/, result.json)",
        soft_wrap=True,
    )


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
