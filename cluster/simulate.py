"""Autoscaling tried on one machine: a local Ray head with Ray's fake multi-node provider,
whose worker node types mirror a cloud cluster config.

Each simulated node is a real raylet on this machine, launched by Ray's own autoscaler when
work is pending and removed after the config's idle timeout, so jobs submitted to it show
the cloud cluster's scaling behaviour. There are no GPUs here: a node type's GPUs become a
custom resource `simulated_GPU`, and its CPUs are capped to what this machine can host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raygen.cluster.errors import ClusterError
from raygen.cluster.jobs import find_token

HEAD_TYPE = "ray.head.default"  # the name Ray's fake provider gives the head's type
SIMULATED_GPU = "simulated_GPU"
# Enough for Ray's minimum; the simulated nodes share this machine's memory.
NODE_OBJECT_STORE_BYTES = 200 * 2**20
# Ray's fake provider (see simulated_provider.py) runs nodes as processes here; the rest of
# each config is unused.
_FAKE_PROVIDER = {
    "type": "external",
    "module": "raygen.cluster.simulated_provider.SimulatedNodeProvider",
    "use_node_id_as_ip": True,
    "disable_node_updaters": True,
    "disable_launch_config_check": True,
}
_EMPTY_KEYS = {
    "auth": {},
    "docker": {},
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def simulation_config(
    config: dict[str, Any],
    idle_timeout_minutes: float | None = None,
    cpus_per_node: int | None = None,
    max_nodes: int = 4,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fake multi-node config mirroring `config`'s worker types, and one row per type
    saying how it was mapped ({type, cloud, simulated, min_workers, max_workers})."""
    cap = cpus_per_node or max(1, (os.cpu_count() or 2) // 2)
    head = config["head_node_type"]
    types: dict[str, Any] = {HEAD_TYPE: {"resources": {}, "node_config": {}, "max_workers": 0}}
    rows = []
    for name, node in config["available_node_types"].items():
        if name == head:
            continue
        cloud = dict(node["resources"])
        simulated = {k: v for k, v in cloud.items() if k not in ("CPU", "GPU")}
        simulated["CPU"] = min(cloud.get("CPU", 1), cap)
        if cloud.get("GPU"):
            simulated[SIMULATED_GPU] = cloud["GPU"]
        high = min(node.get("max_workers", 0), max_nodes)
        types[name] = {
            "resources": {**simulated, "object_store_memory": NODE_OBJECT_STORE_BYTES},
            "node_config": {},
            "min_workers": min(node.get("min_workers", 0), high),
            "max_workers": high,
        }
        rows.append(
            {
                "type": name,
                "cloud": cloud,
                "simulated": simulated,
                "min_workers": types[name]["min_workers"],
                "max_workers": high,
            }
        )
    idle = config.get("idle_timeout_minutes", 5)
    fake = {
        "cluster_name": f"{config['cluster_name']}-simulated",
        "max_workers": min(config.get("max_workers", max_nodes), max_nodes),
        "upscaling_speed": config.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle if idle_timeout_minutes is None else idle_timeout_minutes,
        "provider": dict(_FAKE_PROVIDER),
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        **_EMPTY_KEYS,
    }
    return fake, rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ray_running() -> bool:
    """Whether a Ray cluster already runs on this machine (its GCS answers)."""
    from ray._private.services import find_gcs_addresses

    return bool(find_gcs_addresses())


def start(
    fake_config: dict[str, Any], port: int | None = None, dashboard_port: int | None = None
) -> dict[str, Any]:
    """Start the simulated cluster's head (token authentication on), return its addresses.

    Raises:
        ClusterError: a Ray already runs here, there is no token, or the head failed.
    """
    if local_ray_running():
        raise ClusterError(
            "a Ray cluster already runs on this machine; stop it first (`ray stop`): the "
            "simulation's nodes would join or confuse it."
        )
    token, _ = find_token()
    if token is None:
        raise ClusterError(
            "the simulated cluster uses token authentication like a real one, and you have "
            "no token: create one with `ray get-auth-token --generate`."
        )
    port, dashboard_port = port or free_port(), dashboard_port or free_port()
    folder = Path(tempfile.gettempdir(), "raygen-simulate")
    folder.mkdir(exist_ok=True)
    from ray._private.services import get_node_ip_address

    # Simulated nodes join the head at this address (Ray's fake provider assumes port 6379).
    provider = {**fake_config["provider"], "gcs_address": f"{get_node_ip_address()}:{port}"}
    fake_config = {**fake_config, "provider": provider}
    config_file = folder / f"{fake_config['cluster_name']}.yaml"
    config_file.write_text(json.dumps(fake_config, indent=2))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",  # enables Ray's fake_multinode provider
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "token",
    }
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=0",
        f"--autoscaling-config={config_file}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ClusterError("the simulated head did not start: " + " | ".join(tail))
    return {
        "address": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "config": str(config_file),
    }


def stop() -> None:
    """Stop the simulated cluster: the head and every simulated node (`ray stop`)."""
    ray_cli = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, check=False)


def worker_nodes(dashboard: str) -> list[dict[str, Any]]:
    """The alive non-head nodes, from the State API: [{node_id, resources}]."""
    import requests

    token, _ = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    reply = requests.get(f"{dashboard}/api/v0/nodes", params={"limit": 1000}, headers=headers)
    reply.raise_for_status()
    nodes = reply.json()["data"]["result"]["result"]
    return [
        {"node_id": n["node_id"], "resources": n.get("resources_total", {})}
        for n in nodes
        if n["state"] == "ALIVE" and not n.get("is_head_node")
    ]


def watch(dashboard: str, on_change: Any, interval_s: float = 2.0) -> None:
    """Report the worker nodes each time their count changes, until interrupted."""
    import requests

    seen = -1
    while True:
        try:
            nodes = worker_nodes(dashboard)
        except requests.RequestException as exc:  # the head is starting or gone
            on_change(None, str(exc))
        else:
            if len(nodes) != seen:
                on_change(nodes, None)
                seen = len(nodes)
        time.sleep(interval_s)
