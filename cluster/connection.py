"""Connect to Ray: an embedded local Ray by default, or a running cluster."""

from __future__ import annotations

import logging
import os
import socket

from raygen.cluster.errors import ClusterError

logger = logging.getLogger(__name__)
# Set by Ray's job supervisor in the driver of a job submitted through the Jobs API.


def connect(address: str | None = None, log_to_driver: bool = False) -> bool:
    """Connect this process to Ray.

    Uses `address`, else `RAY_ADDRESS`, else starts an embedded local Ray sized to this
    machine. Does nothing when Ray is already initialized (tests, `raygen submit`).
    Worker output is forwarded here only with `log_to_driver` (it stays in Ray's log
    directory either way).

    Returns:
        True when the Ray in use is an embedded local one this process started.

    Raises:
        ClusterError: the address cannot be reached or refuses us.
    """
    import ray
    import ray.data

    _quiet_ray_data()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    # No credentials go into the job's runtime env: Ray keeps it in its GCS, readable by
    # anyone with the dashboard. An embedded Ray's workers inherit this process's
    # environment; a cluster's nodes carry their own (instance profiles, workload identity).
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
        else:
            # The dashboard serves Ray's State API, which Ray Train's placement-group
            # cleaner needs to free a finished Tune trial's workers' CPUs.
            ray.init(logging_level=logging.WARNING, log_to_driver=log_to_driver)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        where = address or "a new local Ray"
        raise ClusterError(
            f"Cannot connect to Ray at {where}: {exc}. Check the address (ray://HOST:10001 or "
            "HOST:6379, or leave --address out for a local Ray) and that the cluster is up "
            "(`ray status`). With token authentication, set RAY_AUTH_TOKEN."
        ) from None
    return not address


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a `HOST:PORT` or `ray://HOST:PORT` address.

    Ray itself retries an unreachable address for minutes; a refused TCP connection is
    reported at once instead.
    """
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or address == "auto":
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(
            f"Cannot reach a Ray cluster at {address}: {exc.strerror or exc}. Check the host "
            "and port (the head's GCS port, default 6379, or ray://HOST:10001 for Ray Client), "
            "that the cluster is up (`ray status`), and any SSH tunnel; or leave --address "
            "and RAY_ADDRESS unset to use a local Ray."
        ) from None


def _quiet_ray_data() -> None:
    """Keep Ray Data's per-execution INFO lines in its log file, off the console."""
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)


def total_resources() -> dict[str, float]:
    """Resources of every node currently in the cluster."""
    import ray

    return dict(ray.cluster_resources())


def node_resources() -> list[dict[str, float]]:
    """The resources of each node now in the cluster."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def default_worker_cpus(workers: int, use_gpu: bool, nodes: list[dict[str, float]]) -> int:
    """The CPUs each of `workers` training workers gets when the spec does not say, so
    that together they use the whole cluster.

    CPU workers: the most CPUs per worker that still places every worker (a node with C
    CPUs holds C // c workers of c CPUs). GPU workers: the fewest CPUs per GPU of any GPU
    node, one CPU per node left for Ray Data and the driver. At least 1, e.g. on a cluster
    that has yet to scale up.
    """
    if use_gpu:
        shares = [
            int((node.get("CPU", 0) - 1) // node["GPU"])
            for node in nodes
            if node.get("GPU", 0) >= 1
        ]
        return max(1, min(shares, default=1))
    cpus = [int(node.get("CPU", 0)) for node in nodes]
    fitting = [
        c for c in range(1, max(cpus, default=1) + 1) if sum(n // c for n in cpus) >= workers
    ]
    return max(fitting, default=1)


def capacity_problems(per_worker: dict[str, float], num_workers: int, embedded: bool) -> list[str]:
    """Why `num_workers` workers of `per_worker` resources can never be placed, if so.

    An embedded Ray cannot grow, so a shortfall is an error; a remote cluster may autoscale,
    so there it is only logged.
    """
    total = total_resources()
    problems = []
    for name, amount in per_worker.items():
        need = amount * num_workers
        have = total.get(name, 0.0)
        if need > have:
            problems.append(
                f"`scaling`: {num_workers} workers x {amount:g} {name} = {need:g} {name}, but the "
                f"cluster has {have:g} {name}; lower scaling.num_workers or "
                "scaling.resources_per_worker, or use a bigger cluster (--address)."
            )
    if problems and not embedded:
        for p in problems:
            logger.warning("%s (waiting for the cluster to scale up)", p)
        return []
    return problems


def connect_existing(address: str | None = None) -> None:
    """Connect to a running cluster: `address`, else RAY_ADDRESS, else one on this machine.

    Raises:
        ClusterError: no cluster is running there.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        raise ClusterError(
            f"No running Ray cluster found at {address}: {exc}. Give --address (or "
            "RAY_ADDRESS) of a cluster where the app was deployed with --detach."
        ) from None
