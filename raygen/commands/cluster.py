"""`raygen cluster`: validate configs, start and stop clusters on a cloud, simulate
autoscaling on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from raygen import render
from raygen.commands.common import ConfigOption

SHIPPED_CLUSTER_CONFIGS = (
    "ray-cluster.yaml",
    "cluster/clouds/gcp.yaml",
    "cluster/clouds/azure.yaml",
    "cluster/clouds/aws-efa.yaml",
)


def validate(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Cluster configs. Default: raygen's (AWS, GCP, Azure, AWS with EFA)."),
    ] = None,
    spec: Annotated[
        list[Path] | None,
        typer.Option(
            "--spec", help="Train specs the cluster must fit. Default: jobs/examples/*.yaml."
        ),
    ] = None,
) -> None:
    """Check cluster configs against Ray's schema and raygen's rules; exit 2 if any fails."""
    from raygen.cluster.configs import config_problems, load_cluster_config
    from raygen.cluster.errors import ClusterError

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
            render.err.print(f"[red]{path}[/]:", highlight=False)
            for problem in problems:
                render.err.print(f"  - {problem}", highlight=False, markup=False, soft_wrap=True)
        else:
            render.plain(f"{path}: valid (fits {len(shapes)} job specs)")
    if failed:
        raise ClusterError(f"{len(failed)} of {len(files)} cluster configs are invalid.")


def _job_shapes(paths: list[Path]) -> list[Any]:
    """What each train spec asks a cluster for."""
    from raygen.cluster.configs import JobShape
    from raygen.jobs.loader import load_spec
    from raygen.jobs.spec import TrainSpec

    shapes = []
    for path in paths:
        scaling = load_spec(TrainSpec, path).scaling
        shapes.append(JobShape(str(path), scaling.num_workers, scaling.per_worker()))
    return shapes


def up(
    config: ConfigOption = Path("ray-cluster.yaml"),
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
    no_restart: Annotated[
        bool, typer.Option("--no-restart", help="Update files and setup without restarting Ray.")
    ] = False,
) -> None:
    """Create or update the cluster on its cloud (Ray's `ray up`), after checking the config,
    the cloud's credentials and the cluster token."""
    from raygen.cluster.launcher import up as launch_up

    raise typer.Exit(launch_up(config, yes, no_restart))


def down(
    config: ConfigOption = Path("ray-cluster.yaml"),
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
) -> None:
    """Terminate every node of the cluster (Ray's `ray down`)."""
    from raygen.cluster.launcher import down as launch_down

    raise typer.Exit(launch_down(config, yes))


def status(config: ConfigOption = Path("ray-cluster.yaml")) -> None:
    """The head's address, the nodes and the autoscaler's view (`ray status` on the head)."""
    from raygen.cluster.launcher import status as launch_status

    head, code = launch_status(config)
    render.out.print(
        f"head node: {head}  (dashboard: `raygen cluster dashboard --config {config}`)"
    )
    raise typer.Exit(code)


def attach(config: ConfigOption = Path("ray-cluster.yaml")) -> None:
    """Open a shell on the head node (Ray's `ray attach`)."""
    from raygen.cluster.launcher import attach as launch_attach

    raise typer.Exit(launch_attach(config))


def dashboard(
    config: ConfigOption = Path("ray-cluster.yaml"),
    port: Annotated[int, typer.Option("--port", help="Local port of the tunnel.")] = 8265,
) -> None:
    """Tunnel the head's dashboard and Jobs API to http://127.0.0.1:PORT over SSH."""
    from raygen.cluster.launcher import dashboard as tunnel

    render.out.print(f"dashboard and Jobs API on http://127.0.0.1:{port} until Ctrl-C")
    raise typer.Exit(tunnel(config, port))


def simulate(
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
    from raygen.cluster import simulate as simulation
    from raygen.cluster.launcher import checked_config

    fake, rows = simulation.simulation_config(
        checked_config(config), idle_timeout_minutes, cpus_per_node
    )
    cluster = simulation.start(fake)
    render.plain(f"simulated {config} on this machine (head: 0 CPUs):")
    for row in rows:
        render.plain(
            f"  {row['type']}: {row['cloud']} -> {row['simulated']}, "
            f"{row['min_workers']}-{row['max_workers']} nodes"
        )
    render.plain(
        f"idle timeout {fake['idle_timeout_minutes']} min. Submit with "
        f"`raygen submit train SPEC --address {cluster['dashboard']}`; Ctrl-C stops it all."
    )

    def report(nodes: list | None, error: str | None) -> None:
        if nodes is None:
            render.stamped(f"cannot reach the head: {error}", to_err=True)
        else:
            render.stamped(f"worker nodes: {len(nodes)}")

    try:
        simulation.watch(cluster["dashboard"], report)
    except KeyboardInterrupt:
        render.out.print("stopping the simulated cluster")
        simulation.stop()
