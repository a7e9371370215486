"""Ray cluster launcher configs: loading, and validation against Ray's schema and raygen's
own rules (GPU counts that match the instance types, workers that fit the jobs, nothing
that exposes the Jobs API to the internet, token authentication on every node).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raygen.cluster.errors import ClusterError

# GPUs per instance type, for the types raygen's users reach for (unknown types are not
# checked). AWS InstanceType, GCP machineType, Azure vmSize.
KNOWN_GPUS = {
    "aws": {
        "p4d.24xlarge": 8,
        "p4de.24xlarge": 8,
        "p5.48xlarge": 8,
        "p5e.48xlarge": 8,
        "p5en.48xlarge": 8,
        "g5.xlarge": 1,
        "g5.2xlarge": 1,
        "g5.12xlarge": 4,
        "g5.48xlarge": 8,
        "g6e.xlarge": 1,
        "g6e.12xlarge": 4,
        "g6e.48xlarge": 8,
    },
    "gcp": {
        "a2-highgpu-1g": 1,
        "a2-highgpu-2g": 2,
        "a2-highgpu-4g": 4,
        "a2-highgpu-8g": 8,
        "a2-megagpu-16g": 16,
        "a2-ultragpu-8g": 8,
        "a3-highgpu-8g": 8,
        "a3-megagpu-8g": 8,
        "g2-standard-4": 1,
    },
    "azure": {
        "Standard_NC24ads_A100_v4": 1,
        "Standard_NC96ads_A100_v4": 4,
        "Standard_ND96asr_v4": 8,
        "Standard_ND96amsr_A100_v4": 8,
        "Standard_ND96isr_H100_v5": 8,
    },
}
# The GPU model of those instance types, as Ray names it (`accelerator_type:NAME`).
KNOWN_ACCELERATORS = {
    **dict.fromkeys(["p4d.24xlarge", "p4de.24xlarge"], "A100"),
    **dict.fromkeys(["p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"], "H100"),
    **dict.fromkeys(["g5.xlarge", "g5.2xlarge", "g5.12xlarge", "g5.48xlarge"], "A10G"),
    **dict.fromkeys(["g6e.xlarge", "g6e.12xlarge", "g6e.48xlarge"], "L40S"),
    **dict.fromkeys(
        [
            "a2-highgpu-1g",
            "a2-highgpu-2g",
            "a2-highgpu-4g",
            "a2-highgpu-8g",
            "a2-megagpu-16g",
            "a2-ultragpu-8g",
        ],
        "A100",
    ),  # fmt: skip
    **dict.fromkeys(["a3-highgpu-8g", "a3-megagpu-8g"], "H100"),
    "g2-standard-4": "L4",
    **dict.fromkeys(
        [
            "Standard_NC24ads_A100_v4",
            "Standard_NC96ads_A100_v4",
            "Standard_ND96asr_v4",
            "Standard_ND96amsr_A100_v4",
        ],
        "A100",
    ),  # fmt: skip
    "Standard_ND96isr_H100_v5": "H100",
}
ACCELERATOR_PREFIX = "accelerator_type:"
# EFA interfaces an AWS instance type takes: one per network card; 0: no EFA. Types not
# listed are not checked.
EFA_INTERFACES = {
    **dict.fromkeys(["p4d.24xlarge", "p4de.24xlarge"], 4),
    **dict.fromkeys(["p5.48xlarge", "p5e.48xlarge"], 32),
    "p5en.48xlarge": 16,
    **dict.fromkeys(["g5.12xlarge", "g5.48xlarge", "g6e.12xlarge"], 1),
    "g6e.48xlarge": 4,
    **dict.fromkeys(["g5.xlarge", "g5.2xlarge", "g6e.xlarge"], 0),
}
EFA = ("efa", "efa-only")  # InterfaceType of an EFA (`efa-only`: no IP address, EFA traffic only)
# Ports that must not be open to the internet: dashboard / Jobs API, Ray Client, GCS.
PRIVATE_PORTS = {8265: "the dashboard and Jobs API", 10001: "Ray Client", 6379: "the GCS"}


@dataclass(frozen=True)
class JobShape:
    """What a job asks the cluster for: `workers` bundles of `per_worker` resources."""

    name: str
    workers: int
    per_worker: dict[str, float]


def ray_schema() -> dict[str, Any]:
    """Ray's JSON schema of cluster launcher configs, as shipped in the installed wheel."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is a dependency"
    path = Path(next(iter(spec.submodule_search_locations)), "autoscaler", "ray-schema.json")
    return json.loads(path.read_text())


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read a cluster config YAML.

    Raises:
        ClusterError: missing, unreadable, not YAML, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ClusterError(
            f"{path}: no such cluster config; ray-cluster.yaml (AWS) and cluster/clouds/ "
            "(GCP, Azure) are raygen's."
        ) from None
    except OSError as exc:
        raise ClusterError(f"{path}: cannot read it: {exc.strerror}.") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ClusterError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}.") from None
    if not isinstance(config, dict):
        raise ClusterError(f"{path}: a cluster config is a mapping of keys (cluster_name, ...).")
    return config


def config_problems(config: dict[str, Any], jobs: list[JobShape] = ()) -> list[str]:
    """Everything wrong with a cluster config: Ray's schema first, then raygen's rules."""
    import jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    problems = [
        f"`{'.'.join(str(p) for p in error.absolute_path) or '(top level)'}`: {error.message}"
        for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    ]
    if problems:
        return problems  # raygen's rules assume the shape Ray's schema guarantees
    provider = config["provider"]["type"]
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if not types or head not in types:
        return [
            "`head_node_type`: must name one of `available_node_types` (raygen's configs "
            "declare their node types, so the autoscaler knows what each can run)."
        ]
    for name, node in types.items():
        problems += _gpu_problems(provider, name, node)
        low, high = node.get("min_workers", 0), node.get("max_workers", 0)
        if name != head and low > high:
            problems.append(
                f"`available_node_types.{name}`: min_workers {low} > max_workers {high}."
            )
    minimum = sum(n.get("min_workers", 0) for k, n in types.items() if k != head)
    if minimum > config.get("max_workers", minimum):
        problems.append(
            f"`max_workers`: {config['max_workers']} is below the {minimum} workers the node "
            "types keep running (their min_workers)."
        )
    if provider == "aws":
        problems += _interface_problems(config)
    problems += _exposure_problems(config)
    problems += _token_problems(config)
    problems += fit_problems(config, jobs)
    return problems


def _gpu_problems(provider: str, name: str, node: dict[str, Any]) -> list[str]:
    key = f"`available_node_types.{name}`"
    declared = node["resources"].get("GPU", 0)
    node_config = node.get("node_config") or {}
    instance = (
        node_config.get("InstanceType")
        or node_config.get("machineType")
        or (node_config.get("azure_arm_parameters") or {}).get("vmSize")
    )
    problems = []
    real = KNOWN_GPUS.get(provider, {}).get(instance)
    if real is not None and declared != real:
        problems.append(
            f"{key}: resources.GPU is {declared}, but a {instance} has {real} GPUs; set "
            f"GPU: {real} (the autoscaler schedules by the declared count)."
        )
    model = KNOWN_ACCELERATORS.get(instance)
    if model and node["resources"].get(ACCELERATOR_PREFIX + model) != 1:
        problems.append(
            f"{key}: a {instance} has {model} GPUs: declare `{ACCELERATOR_PREFIX}{model}: 1` "
            f"in its resources, so the autoscaler starts it for jobs that ask for {model}."
        )
    attached = sum(a.get("acceleratorCount", 0) for a in node_config.get("guestAccelerators", []))
    if provider == "gcp" and attached and attached != declared:
        problems.append(
            f"{key}: guestAccelerators attach {attached} GPUs but resources.GPU is {declared}; "
            "make them equal."
        )
    return problems


def efa_node_types(config: dict[str, Any]) -> list[str]:
    """The node types of an AWS config whose nodes have EFA interfaces."""
    return [
        name
        for name, node in (config.get("available_node_types") or {}).items()
        if any(i.get("InterfaceType") in EFA for i in _interfaces(node))
    ]


def _interfaces(node: dict[str, Any]) -> list[dict[str, Any]]:
    return (node.get("node_config") or {}).get("NetworkInterfaces") or []


def _interface_problems(config: dict[str, Any]) -> list[str]:
    """AWS network interfaces as Ray's launcher takes them, and EFA as NCCL needs it."""
    problems = []
    efa_types: list[str] = []
    for name, node in config["available_node_types"].items():
        interfaces = _interfaces(node)
        if not interfaces:
            continue
        key = f"`available_node_types.{name}.node_config"
        both = [
            k for k in ("SubnetId", "SubnetIds", "SecurityGroupIds") if k in node["node_config"]
        ]
        if both:
            problems.append(
                f"{key}`: {', '.join(both)} beside NetworkInterfaces: with interfaces, Ray's "
                "launcher takes the subnet and security groups from each interface only; "
                "move them there (SubnetId, Groups)."
            )
        for i, interface in enumerate(interfaces):
            missing = [k for k in ("SubnetId", "Groups") if not interface.get(k)]
            if missing:
                problems.append(
                    f"{key}.NetworkInterfaces[{i}]`: no {' or '.join(missing)}; Ray's launcher "
                    "needs each interface's subnet and security groups."
                )
        efa = [i for i in interfaces if i.get("InterfaceType") in EFA]
        if not efa:
            continue
        instance = node["node_config"].get("InstanceType")
        most = EFA_INTERFACES.get(instance)
        if most == 0:
            have = ", ".join(k for k, v in EFA_INTERFACES.items() if v)
            problems.append(
                f"{key}`: a {instance} has no EFA; remove the EFA interfaces or use an "
                f"instance type that has them ({have})."
            )
        elif most is not None and len(efa) > most:
            problems.append(
                f"{key}.NetworkInterfaces`: a {instance} takes {most} EFA interfaces (one per "
                f"network card), not {len(efa)}."
            )
        cards = Counter(i.get("NetworkCardIndex", 0) for i in efa)
        shared = sorted(card for card, count in cards.items() if count > 1)
        if shared:
            problems.append(
                f"{key}.NetworkInterfaces`: network card {shared[0]} has {cards[shared[0]]} "
                "EFA interfaces; a card takes one EFA (give each its own NetworkCardIndex)."
            )
        slots = Counter((i.get("NetworkCardIndex", 0), i.get("DeviceIndex")) for i in interfaces)
        taken = sorted(slot for slot, count in slots.items() if count > 1)
        if taken:
            problems.append(
                f"{key}.NetworkInterfaces`: {slots[taken[0]]} interfaces at DeviceIndex "
                f"{taken[0][1]} of network card {taken[0][0]}; each needs its own."
            )
        if not any(
            i.get("DeviceIndex") == 0 and i.get("NetworkCardIndex", 0) == 0 for i in interfaces
        ):
            problems.append(
                f"{key}.NetworkInterfaces`: no primary interface (DeviceIndex 0 on network card "
                "0); the node's address is on it."
            )
        efa_types.append(name)
    if efa_types:
        problems += _efa_software_problems(config, efa_types)
    return problems


def _efa_software_problems(config: dict[str, Any], efa_types: list[str]) -> list[str]:
    """What NCCL needs on nodes with EFA: the devices and unlimited locked memory in their
    containers, and the settings that make it use EFA (not TCP), in the environment `ray
    start` runs in (every training worker inherits it)."""
    problems = []
    docker = config.get("docker") or {}
    for name in efa_types:
        role = "head" if name == config["head_node_type"] else "worker"
        own = config["available_node_types"][name].get("docker") or {}
        options_key = f"{role}_run_options"
        where = f"available_node_types.{name}.docker" if options_key in own else "docker"
        options = " ".join(docker.get("run_options", []) + {**docker, **own}.get(options_key, []))
        if docker and ("/dev/infiniband" not in options or not re.search(r"memlock=-1\b", options)):
            problems.append(
                f"`{where}.{options_key}`: the containers of {name} cannot use its EFA "
                "devices: add `--device=/dev/infiniband` and `--ulimit memlock=-1:-1` "
                "(libfabric locks the memory it sends from)."
            )
        commands_key = f"{role}_start_ray_commands"
        environment = " ".join(config.get(commands_key) or []) + " " + options
        wanted = {
            "FI_PROVIDER": ("efa", "libfabric's EFA provider, not a silent fallback to TCP"),
            "NCCL_NET_PLUGIN": (
                r"\S+",
                "NCCL's EFA plugin, aws-ofi-nccl (`ofi`), on LD_LIBRARY_PATH",
            ),
        }
        for variable, (value, why) in wanted.items():
            if not re.search(rf"(^|[\s;]){variable}={value}(\s|;|$)", environment):
                shown = f"{variable}=efa" if value == "efa" else f"{variable}=ofi"
                problems.append(
                    f"`{commands_key}`: NCCL on {name}'s EFA needs {shown} ({why}) in the "
                    "environment `ray start` runs in; see cluster/clouds/aws-efa.yaml."
                )
    return problems


def _exposure_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    group = config["provider"].get("security_group") or {}
    for rule in group.get("IpPermissions", []):
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        for port, what in PRIVATE_PORTS.items():
            if public and low <= port <= high:
                problems.append(
                    f"`provider.security_group`: port {port} ({what}) is open to 0.0.0.0/0: "
                    "anyone who reaches it can run code on the cluster. Keep it closed and use "
                    "`raygen cluster dashboard` (an SSH tunnel), or allow only your network."
                )
    return problems


def _token_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(config.get(key) or [])
        if "ray start" in commands and not re.search(r"RAY_AUTH_MODE=token", commands):
            problems.append(
                f"`{key}`: Ray starts without token authentication; set RAY_AUTH_MODE=token "
                "before `ray start` (and mount the token file, ~/.ray/auth_token, on every "
                "node), so only holders of the token can use the cluster."
            )
    return problems


def fit_problems(config: dict[str, Any], jobs: list[JobShape]) -> list[str]:
    """Jobs that no combination of the config's worker nodes can run."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    problems = []
    offered: dict[str, list[str]] = {}
    for name, node in types.items():
        for resource in node["resources"]:
            if resource.startswith(ACCELERATOR_PREFIX):
                offered.setdefault(resource.removeprefix(ACCELERATOR_PREFIX), []).append(name)
    for job in jobs:
        wanted = [k.removeprefix(ACCELERATOR_PREFIX) for k in job.per_worker
                  if k.startswith(ACCELERATOR_PREFIX)]  # fmt: skip
        missing = [model for model in wanted if model not in offered]
        if missing:
            have = "; ".join(f"{m} ({', '.join(names)})" for m, names in sorted(offered.items()))
            problems.append(
                f"{job.name}: asks for {missing[0]} GPUs, which no node type has (node types "
                f"have: {have or 'no declared GPU models'}); set scaling.accelerator_type to "
                "one of those, or add a node type with that GPU."
            )
            continue
        capacity = 0
        for name, node in types.items():
            count = _bundles(node["resources"], job.per_worker)
            limit = 1 if name == head else node.get("max_workers", 0)
            capacity += count * limit
        if capacity < job.workers:
            ask = ", ".join(f"{k}: {v:g}" for k, v in job.per_worker.items())
            problems.append(
                f"{job.name}: needs {job.workers} workers of {{{ask}}}, but the node types fit "
                f"{capacity} at most; add a node type with these resources or raise max_workers."
            )
    return problems


def _bundles(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of `bundle` fit on a node with `resources`."""
    fits = [int(resources.get(k, 0) // v) for k, v in bundle.items() if v > 0]
    return min(fits) if fits else 0
