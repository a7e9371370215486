"""Cluster launcher configs: the shipped ones are valid, mistakes are named; the cloud
commands check config, credentials and token before Ray's launcher runs (clouds are not
reachable from CI, so only their refusals run here)."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raygen.cluster.configs import JobShape, config_problems, load_cluster_config
from raygen.cluster.simulate import SIMULATED_GPU, simulation_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [
    ROOT / "ray-cluster.yaml",
    ROOT / "cluster/clouds/gcp.yaml",
    ROOT / "cluster/clouds/azure.yaml",
    ROOT / "cluster/clouds/aws-efa.yaml",
]


def raygen(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raygen", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


@pytest.fixture
def aws() -> dict:
    return load_cluster_config(ROOT / "ray-cluster.yaml")


def test_every_shipped_config_is_valid_and_fits_the_example_specs():
    done = raygen("cluster", "validate")
    assert done.returncode == 0, done.stderr
    specs = len(list((ROOT / "jobs" / "examples").glob("*.yaml")))
    assert done.stdout.count(f"valid (fits {specs} job specs)") == len(SHIPPED)
    for path in SHIPPED:
        config = load_cluster_config(path)
        assert config["provider"]["type"] in {"aws", "gcp", "azure"}
        gpu_types = [
            n for n in config["available_node_types"].values() if n["resources"].get("GPU")
        ]
        assert gpu_types and all(n["min_workers"] == 0 for n in gpu_types)
        assert config["idle_timeout_minutes"] > 0


def test_schema_errors_name_the_key(aws):
    aws["max_workers"] = "eight"
    del aws["provider"]["type"]
    problems = config_problems(aws)
    assert "`max_workers`: 'eight' is not of type 'integer'" in problems
    assert "`provider`: 'type' is a required property" in problems


def test_gpu_counts_must_match_the_instance_type(aws):
    aws["available_node_types"]["gpu_a100"]["resources"]["GPU"] = 4
    gcp = load_cluster_config(ROOT / "cluster/clouds/gcp.yaml")
    gcp["available_node_types"]["gpu_a100"]["node_config"]["guestAccelerators"][0][
        "acceleratorCount"
    ] = 4
    assert config_problems(aws) == [
        "`available_node_types.gpu_a100`: resources.GPU is 4, but a p4d.24xlarge has 8 GPUs; "
        "set GPU: 8 (the autoscaler schedules by the declared count)."
    ]
    assert config_problems(gcp) == [
        "`available_node_types.gpu_a100`: guestAccelerators attach 4 GPUs but resources.GPU "
        "is 8; make them equal."
    ]


def test_public_jobs_api_and_missing_token_auth_are_refused(aws):
    aws["provider"]["security_group"]["IpPermissions"].append(
        {
            "FromPort": 8265,
            "ToPort": 8265,
            "IpProtocol": "tcp",
            "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
        }
    )
    aws["worker_start_ray_commands"] = ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
    problems = config_problems(aws)
    assert len(problems) == 2
    assert problems[0].startswith(
        "`provider.security_group`: port 8265 (the dashboard and Jobs API)"
    )
    assert problems[1].startswith("`worker_start_ray_commands`: Ray starts without token")


def test_a_job_the_node_types_cannot_hold_is_named(aws):
    jobs = [
        JobShape("llama.yaml", 32, {"CPU": 8, "GPU": 1}),  # 8 per node x 8 nodes: fits
        JobShape("huge.yaml", 65, {"CPU": 8, "GPU": 1}),
        JobShape("fat.yaml", 1, {"CPU": 8, "GPU": 16}),
    ]
    assert config_problems(aws, jobs) == [
        "huge.yaml: needs 65 workers of {CPU: 8, GPU: 1}, but the node types fit 64 at most; "
        "add a node type with these resources or raise max_workers.",
        "fat.yaml: needs 1 workers of {CPU: 8, GPU: 16}, but the node types fit 0 at most; "
        "add a node type with these resources or raise max_workers.",
    ]


def test_validate_cli_reports_each_bad_file_and_exits_2(tmp_path, aws):
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu_a100_spot"]["min_workers"] = 9
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    (tmp_path / "notyaml.yaml").write_text("cluster_name: [unclosed\n")
    done = raygen(
        "cluster",
        "validate",
        str(ROOT / "ray-cluster.yaml"),
        str(tmp_path / "broken.yaml"),
        str(tmp_path / "notyaml.yaml"),
        str(tmp_path / "missing.yaml"),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "ray-cluster.yaml: valid" in done.stdout
    assert "min_workers 9 > max_workers 4" in done.stderr
    assert "not valid YAML at line 2" in done.stderr
    assert "missing.yaml: no such cluster config" in done.stderr
    assert "3 of 4 cluster configs are invalid" in done.stderr


def test_cloud_commands_check_credentials_and_token_before_ray_runs(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),  # no ~/.aws, no ~/.ray/auth_token
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    done = raygen("cluster", "up", "--config", str(ROOT / "ray-cluster.yaml"), "--yes", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no AWS credentials: run `aws configure`" in done.stderr
    assert "create it with `ray get-auth-token --generate`" in done.stderr
    done = raygen("cluster", "status", "--config", str(ROOT / "cluster/clouds/gcp.yaml"), env=env)
    assert done.returncode == 2
    assert "Ray's gcp provider needs googleapiclient" in done.stderr
    assert "pip install google-api-python-client" in done.stderr
    done = raygen("cluster", "down", "--config", str(ROOT / "ray-cluster.yaml"), env=env)
    assert (
        done.returncode == 2 and "ray-cluster.yaml's cloud:\n  - no AWS credentials" in done.stderr
    )
    assert "token" not in done.stderr  # tearing down needs no token
    for command in ("attach", "dashboard", "simulate"):
        done = raygen("cluster", command, "--config", str(tmp_path / "nope.yaml"), env=env)
        assert done.returncode == 2 and "nope.yaml: no such cluster config" in done.stderr


def test_simulation_mirrors_the_node_types_without_gpus(aws):
    fake, rows = simulation_config(aws, idle_timeout_minutes=0.1, cpus_per_node=1, max_nodes=3)
    provider = fake["provider"]
    assert provider["type"] == "external"
    assert importlib.import_module(provider["module"].rsplit(".", 1)[0])  # the autoscaler's
    assert fake["idle_timeout_minutes"] == 0.1 and fake["max_workers"] == 3
    worker = fake["available_node_types"]["gpu_a100"]
    assert worker["resources"]["CPU"] == 1 and worker["resources"][SIMULATED_GPU] == 8
    assert "GPU" not in worker["resources"] and worker["max_workers"] == 3
    assert fake["available_node_types"]["ray.head.default"]["max_workers"] == 0
    assert [r["type"] for r in rows] == ["gpu_a100", "gpu_a100_spot"]
    assert rows[0]["cloud"] == {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}
    assert worker["resources"]["accelerator_type:A100"] == 1  # GPU-model jobs simulate too


def test_gpu_models_are_declared_and_jobs_asking_for_another_are_named(aws):
    from raygen.jobs.spec import ScalingSpec

    a100 = ScalingSpec(num_workers=16, use_gpu=True, accelerator_type="A100")
    assert a100.per_worker(8) == {"CPU": 8, "GPU": 1, "accelerator_type:A100": 0.001}
    h100 = ScalingSpec(num_workers=8, use_gpu=True, accelerator_type="H100")
    jobs = [
        JobShape("a100.yaml", 16, a100.per_worker(8)),
        JobShape("h100.yaml", 8, h100.per_worker(8)),
    ]
    assert config_problems(aws, jobs) == [
        "h100.yaml: asks for H100 GPUs, which no node type has (node types have: A100 "
        "(gpu_a100, gpu_a100_spot)); set scaling.accelerator_type to one of those, or add a "
        "node type with that GPU."
    ]
    del aws["available_node_types"]["gpu_a100"]["resources"]["accelerator_type:A100"]
    assert config_problems(aws) == [
        "`available_node_types.gpu_a100`: a p4d.24xlarge has A100 GPUs: declare "
        "`accelerator_type:A100: 1` in its resources, so the autoscaler starts it for jobs "
        "that ask for A100."
    ]


def test_a_gpu_model_needs_a_gpu_in_train_and_deploy_specs():
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.validate import portable_problems
    from raygen.serving.router import actor_options
    from raygen.serving.spec import ReplicaSpec

    raw = {"name": "t", "model": {"arch": "gpt2"}, "data": {"train": "builtin:python-stdlib"}}
    spec = validate_spec(TrainSpec, {**raw, "scaling": {"accelerator_type": "A100"}}, "t.yaml")
    assert any(
        "`scaling.accelerator_type`: A100 is a GPU model" in p for p in portable_problems(spec)
    )
    with pytest.raises(ValueError, match="accelerator_type H100 is a GPU model: set num_gpus > 0"):
        ReplicaSpec(accelerator_type="H100")
    replica = ReplicaSpec(num_gpus=1, accelerator_type="H100")
    assert actor_options(replica) == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "H100"}


@pytest.fixture
def efa() -> dict:
    return load_cluster_config(ROOT / "cluster/clouds/aws-efa.yaml")


def test_efa_mistakes_are_named(efa):
    node = efa["available_node_types"]["gpu_a100_efa"]["node_config"]
    interfaces = node["NetworkInterfaces"]
    assert [i["InterfaceType"] for i in interfaces] == ["efa"] * 4  # one per p4d network card
    assert config_problems(efa) == []

    broken = copy.deepcopy(efa)
    bad = broken["available_node_types"]["gpu_a100_efa"]["node_config"]
    bad["NetworkInterfaces"].append(interfaces[3])
    bad["NetworkInterfaces"][0] = {**interfaces[0], "DeviceIndex": 1}
    del bad["NetworkInterfaces"][1]["Groups"]
    bad["SecurityGroupIds"] = ["sg-1"]
    broken["docker"]["worker_run_options"] = ["--device=/dev/infiniband"]
    broken["worker_start_ray_commands"] = [
        c.replace("FI_PROVIDER=efa ", "") for c in broken["worker_start_ray_commands"]
    ]
    key = "`available_node_types.gpu_a100_efa.node_config"
    assert config_problems(broken) == [
        f"{key}`: SecurityGroupIds beside NetworkInterfaces: with interfaces, Ray's launcher "
        "takes the subnet and security groups from each interface only; move them there "
        "(SubnetId, Groups).",
        f"{key}.NetworkInterfaces[1]`: no Groups; Ray's launcher needs each interface's "
        "subnet and security groups.",
        f"{key}.NetworkInterfaces`: a p4d.24xlarge takes 4 EFA interfaces (one per network "
        "card), not 5.",
        f"{key}.NetworkInterfaces`: network card 3 has 2 EFA interfaces; a card takes one "
        "EFA (give each its own NetworkCardIndex).",
        f"{key}.NetworkInterfaces`: 2 interfaces at DeviceIndex 1 of network card 3; each "
        "needs its own.",
        f"{key}.NetworkInterfaces`: no primary interface (DeviceIndex 0 on network card 0); "
        "the node's address is on it.",
        "`docker.worker_run_options`: the containers of gpu_a100_efa cannot use its EFA "
        "devices: add `--device=/dev/infiniband` and `--ulimit memlock=-1:-1` (libfabric "
        "locks the memory it sends from).",
        "`worker_start_ray_commands`: NCCL on gpu_a100_efa's EFA needs FI_PROVIDER=efa "
        "(libfabric's EFA provider, not a silent fallback to TCP) in the environment `ray "
        "start` runs in; see cluster/clouds/aws-efa.yaml.",
    ]
    # AWS's newer layout: an ordinary interface beside an EFA-only one on the first card.
    layout = copy.deepcopy(efa)
    layout_node = layout["available_node_types"]["gpu_a100_efa"]["node_config"]
    layout_node["NetworkInterfaces"] = [
        {**interfaces[0], "InterfaceType": "interface"},
        {**interfaces[0], "DeviceIndex": 1, "InterfaceType": "efa-only"},
        *({**i, "DeviceIndex": 0, "InterfaceType": "efa-only"} for i in interfaces[1:]),
    ]
    assert config_problems(layout) == []
    small = copy.deepcopy(efa)
    small["available_node_types"]["gpu_a100_efa"]["node_config"]["InstanceType"] = "g5.xlarge"
    small["available_node_types"]["gpu_a100_efa"]["resources"] = {
        "CPU": 4,
        "GPU": 1,
        "accelerator_type:A10G": 1,
    }
    assert config_problems(small) == [
        f"{key}`: a g5.xlarge has no EFA; remove the EFA interfaces or use an instance type "
        "that has them (p4d.24xlarge, p4de.24xlarge, p5.48xlarge, p5e.48xlarge, "
        "p5en.48xlarge, g5.12xlarge, g5.48xlarge, g6e.12xlarge, g6e.48xlarge).",
    ]


def test_efa_cluster_is_checked_on_aws_and_launched_by_rays_own_launcher(
    s3_endpoint, tmp_path, monkeypatch
):
    """Against the moto server's EC2 and IAM: `cluster up`'s checks of the subnet and
    security group, then Ray's AWS launcher (its config stage and node provider, as `ray
    up` runs them) taking the shipped EFA config and requesting a p4d.24xlarge with its
    interfaces, which botocore checks against EC2's API model. (moto keeps neither the
    interfaces' types and cards nor EC2's rules about them: those are validate's above.)"""
    import boto3

    from raygen.cluster.launcher import launch_problems

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes the cluster's SSH key there
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("token")
    ec2 = boto3.client("ec2", region_name="us-west-2")
    vpc = ec2.create_vpc(CidrBlock="10.8.0.0/16")["Vpc"]["VpcId"]
    subnets = {
        zone: ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
        for zone, cidr in (("us-west-2a", "10.8.1.0/24"), ("us-west-2b", "10.8.2.0/24"))
    }
    group = ec2.create_security_group(GroupName="efa", Description="EFA", VpcId=vpc)["GroupId"]
    itself = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}]
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=itself)
    text = (ROOT / "cluster/clouds/aws-efa.yaml").read_text()

    # As shipped: the two placeholders, each named once, with where to find the value.
    done = raygen("cluster", "up", "--config", str(ROOT / "cluster/clouds/aws-efa.yaml"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "`available_node_types.head.node_config.NetworkInterfaces[0].SubnetId` (and 4 more "
        "places): subnet-your-efa-subnet is a placeholder for a subnet's ID" in done.stderr
    )
    assert "sg-your-efa-security-group is a placeholder for a security group's ID" in done.stderr
    # Tearing down or asking the status is not refused for them (nor for the network).
    assert launch_problems(yaml.safe_load(text), need_token=False) == []

    def filled(subnet: str) -> dict:
        config = yaml.safe_load(
            text.replace("subnet-your-efa-subnet", subnet).replace(
                "sg-your-efa-security-group", group
            )
        )
        assert config_problems(config) == []
        return config

    assert launch_problems(filled(subnets["us-west-2a"])) == [
        f"subnet {subnets['us-west-2a']} is in us-west-2a, not in the provider's "
        "availability_zone (us-west-2b); set one to match the other.",
        f"security group {group} (efa) does not let all traffic out to itself, which EFA "
        f"needs: `aws ec2 authorize-security-group-egress --group-id {group} --ip-permissions "
        f"'IpProtocol=-1,UserIdGroupPairs=[{{GroupId={group}}}]'`.",
    ]
    ec2.authorize_security_group_egress(GroupId=group, IpPermissions=itself)
    config = filled(subnets["us-west-2b"])
    assert launch_problems(config) == []
    missing = filled("subnet-0123456789abcdef0")
    (problem,) = launch_problems(missing)
    assert problem.startswith("AWS refused to describe the config's network") and (
        "InvalidSubnetID.NotFound" in problem
    )

    # Ray's launcher takes it: its config stage (IAM profile, key pair, subnets and groups
    # from the interfaces), then a GPU node with four EFA interfaces, as the autoscaler
    # would start one. botocore checks every parameter against EC2's API model first.
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.commands import _bootstrap_config

    iam = boto3.client("iam")
    iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
    iam.add_role_to_instance_profile(
        InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1"
    )
    ready = _bootstrap_config(config, no_config_cache=True)
    gpu = ready["available_node_types"]["gpu_a100_efa"]["node_config"]
    assert set(gpu["SubnetIds"]) == {subnets["us-west-2b"]} and set(gpu["SecurityGroupIds"]) == {
        group
    }
    provider = AWSNodeProvider(ready["provider"], ready["cluster_name"])
    provider.create_node(gpu, {"ray-node-type": "worker", "ray-user-node-type": "gpu"}, 1)
    (instance,) = [
        i
        for r in ec2.describe_instances(
            Filters=[{"Name": "tag:ray-user-node-type", "Values": ["gpu"]}]
        )["Reservations"]
        for i in r["Instances"]
    ]
    assert instance["InstanceType"] == "p4d.24xlarge"
    assert instance["Placement"]["AvailabilityZone"] == "us-west-2b"
    assert {n["SubnetId"] for n in instance["NetworkInterfaces"]} == {subnets["us-west-2b"]}
    assert {g["GroupId"] for n in instance["NetworkInterfaces"] for g in n["Groups"]} == {group}
