"""Cloud clusters through Ray's cluster launcher: up, down, status, attach, dashboard.

raygen checks what it can before handing over to Ray (the config, the cloud's
credentials and SDK, the cluster token) so a mistake is one clear line, not a stack trace
from a cloud SDK halfway through creating instances.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from raygen.cluster.configs import (
    EFA,
    JobShape,
    config_problems,
    efa_node_types,
    load_cluster_config,
)
from raygen.cluster.errors import ClusterError

# The Python packages each provider's node provider imports, and how to get them.
PROVIDER_PACKAGES = {
    "aws": (["boto3"], "pip install boto3"),
    "gcp": (["googleapiclient", "google.auth"], "pip install google-api-python-client"),
    "azure": (
        ["azure.identity", "azure.mgmt.compute", "azure.mgmt.network", "azure.mgmt.resource"],
        "pip install azure-identity azure-mgmt-compute azure-mgmt-network azure-mgmt-resource",
    ),
}
TOKEN_FILE_MOUNT = "~/.ray/auth_token"
# Values a shipped config leaves for its user to fill (`your-...`), and what goes there.
PLACEHOLDER = re.compile(r"^([a-z]+-)?your-")
PLACEHOLDER_HINTS = {
    "SubnetId": "a subnet's ID (subnet-...) in the provider's availability zone; `aws ec2 "
    "describe-subnets --query 'Subnets[].[SubnetId,AvailabilityZone,VpcId]'` lists them",
    "Groups": "a security group's ID (sg-...); `aws ec2 describe-security-groups --query "
    "'SecurityGroups[].[GroupId,GroupName,VpcId]'` lists them",
    "project_id": "your Google Cloud project's id; `gcloud config get-value project` says it",
}


def checked_config(path: str | Path, jobs: list[JobShape] = ()) -> dict[str, Any]:
    """Load a cluster config and raise one ClusterError listing every problem."""
    config = load_cluster_config(path)
    problems = config_problems(config, jobs)
    _raise_if(problems, str(path))
    return config


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ClusterError(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))


def launch_problems(config: dict[str, Any], need_token: bool = True) -> list[str]:
    """What would stop Ray's launcher on this machine: the provider's SDK, credentials and,
    to start nodes (`need_token`), values left as placeholders, the network on AWS and the
    cluster token the config copies to them."""
    provider = config["provider"]["type"]
    # Placeholders and the network matter to starting nodes; tearing a cluster down or asking
    # its status must not be refused for them.
    problems = placeholder_problems(config) if need_token else []
    modules, install = PROVIDER_PACKAGES.get(provider, ([], ""))
    missing = [m for m in modules if not _importable(m)]
    if missing:
        problems.append(f"Ray's {provider} provider needs {', '.join(missing)}: `{install}`.")
    elif provider == "aws":
        import boto3

        if boto3.Session().get_credentials() is None:
            problems.append(
                "no AWS credentials: run `aws configure`, or set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
            )
        elif need_token and not problems:
            problems += aws_network_problems(config)
    elif provider == "gcp":
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError:
            problems.append(
                "no Google Cloud credentials: run `gcloud auth application-default login`."
            )
    mounts = config.get("file_mounts") or {}
    token_missing = not Path(TOKEN_FILE_MOUNT).expanduser().is_file()
    if need_token and TOKEN_FILE_MOUNT in mounts.values() and token_missing:
        problems.append(
            f"the config copies your cluster token ({TOKEN_FILE_MOUNT}) to every node, and "
            "there is none yet: create it with `ray get-auth-token --generate`."
        )
    return problems


def placeholder_problems(config: dict[str, Any]) -> list[str]:
    """Values the config leaves to be filled (`your-...`), each once, where it first appears."""
    found: dict[str, list[str]] = {}

    def walk(value: Any, path: list[str]) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, [*path, str(key)])
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(inner, [*path[:-1], f"{path[-1]}[{i}]"] if path else [f"[{i}]"])
        elif isinstance(value, str) and PLACEHOLDER.search(value):
            found.setdefault(value, []).append(".".join(path))

    walk(config, [])
    problems = []
    for value, paths in found.items():
        key = paths[0].rsplit(".", 1)[-1].split("[")[0]
        hint = PLACEHOLDER_HINTS.get(key, "your own value")
        more = f" (and {len(paths) - 1} more places)" if len(paths) > 1 else ""
        problems.append(f"`{paths[0]}`{more}: {value} is a placeholder for {hint}.")
    return problems


def aws_network_problems(config: dict[str, Any]) -> list[str]:
    """What AWS says of the subnets and security groups the config's network interfaces
    name: that they exist, the subnets in the provider's zones, and each group on an EFA
    interface open to all traffic from itself, both ways (EFA's requirement: without it the
    first collective across nodes hangs)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    interfaces = [
        interface
        for node in config["available_node_types"].values()
        for interface in (node.get("node_config") or {}).get("NetworkInterfaces") or []
    ]
    subnets = sorted({i["SubnetId"] for i in interfaces if i.get("SubnetId")})
    groups = sorted({g for i in interfaces for g in i.get("Groups") or []})
    efa_groups = {
        g
        for name in efa_node_types(config)
        for i in config["available_node_types"][name]["node_config"]["NetworkInterfaces"]
        if i.get("InterfaceType") in EFA
        for g in i.get("Groups") or []
    }
    if not subnets and not groups:
        return []
    provider = config["provider"]
    ec2 = boto3.client("ec2", region_name=provider["region"])
    zones = [z.strip() for z in str(provider.get("availability_zone") or "").split(",") if z]
    problems = []
    try:
        if subnets:
            for subnet in ec2.describe_subnets(SubnetIds=subnets)["Subnets"]:
                if zones and subnet["AvailabilityZone"] not in zones:
                    problems.append(
                        f"subnet {subnet['SubnetId']} is in {subnet['AvailabilityZone']}, not "
                        f"in the provider's availability_zone ({', '.join(zones)}); set one "
                        "to match the other."
                    )
        if groups:
            for group in ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]:
                if group["GroupId"] in efa_groups:
                    problems += _efa_group_problems(group)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        problems.append(
            f"AWS refused to describe the config's network ({', '.join(subnets + groups)}) in "
            f"{provider['region']}: {error.get('Code')}: {error.get('Message')}"
        )
    except BotoCoreError as exc:
        problems.append(f"cannot reach AWS to check the config's network: {exc}")
    return problems


def _efa_group_problems(group: dict[str, Any]) -> list[str]:
    gid = group["GroupId"]
    problems = []
    for rules, direction, command in (
        (group.get("IpPermissions", []), "in from", "ingress"),
        (group.get("IpPermissionsEgress", []), "out to", "egress"),
    ):
        if not any(
            rule.get("IpProtocol") == "-1"
            and any(pair.get("GroupId") == gid for pair in rule.get("UserIdGroupPairs", []))
            for rule in rules
        ):
            problems.append(
                f"security group {gid} ({group.get('GroupName')}) does not let all traffic "
                f"{direction} itself, which EFA needs: `aws ec2 authorize-security-group-"
                f"{command} --group-id {gid} --ip-permissions "
                f"'IpProtocol=-1,UserIdGroupPairs=[{{GroupId={gid}}}]'`."
            )
    return problems


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _ray(*args: str) -> int:
    """Run Ray's own CLI (the one installed with raygen), with the terminal attached."""
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli) if ray_cli.exists() else "ray", *args]
    return subprocess.call(command, env=os.environ.copy())


def up(path: str | Path, yes: bool = False, no_restart: bool = False) -> int:
    """Create or update the cluster (`ray up`); returns Ray's exit code."""
    config = checked_config(path)
    problems = launch_problems(config)
    _raise_if(problems, f"cannot start {path}")
    return _ray(
        "up", str(path), *(["--yes"] if yes else []), *(["--no-restart"] if no_restart else [])
    )


def down(path: str | Path, yes: bool = False) -> int:
    """Terminate every node of the cluster (`ray down`)."""
    config = checked_config(path)
    problems = launch_problems(config, need_token=False)
    _raise_if(problems, f"cannot reach {path}'s cloud")
    return _ray("down", str(path), *(["--yes"] if yes else []))


def status(path: str | Path) -> tuple[str, int]:
    """(head IP, exit code of `ray status` run on the head): the nodes, pending demand and
    what the autoscaler is doing."""
    from ray.autoscaler.sdk import get_head_node_ip

    config = checked_config(path)
    problems = launch_problems(config, need_token=False)
    _raise_if(problems, f"cannot reach {path}'s cloud")
    try:
        head = get_head_node_ip(str(path))
    except RuntimeError as exc:  # Ray's "Head node of cluster (...) not found!"
        raise ClusterError(
            f"{path}: {exc} Start it with `raygen cluster up --config {path}`."
        ) from None
    return head, _ray("exec", str(path), "ray status")


def attach(path: str | Path) -> int:
    """An SSH shell on the head node (`ray attach`)."""
    checked_config(path)
    return _ray("attach", str(path))


def dashboard(path: str | Path, port: int = 8265) -> int:
    """Forward the head's dashboard / Jobs API to http://127.0.0.1:PORT over SSH until Ctrl-C
    (`ray dashboard`); `raygen submit --address http://127.0.0.1:PORT` then reaches it."""
    checked_config(path)
    return _ray("dashboard", str(path), "--port", str(port))
