"""`raygen k8s render`: every manifest valid against KubeRay v1.7.0's CRD schemas (as the
API server would check it), and the fields that matter right: images, resources,
entrypoints and specs, the serve config, Secrets named and never inlined."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import raygen

ROOT = Path(__file__).resolve().parents[2]
# KubeRay's own CRDs, beside the checkout (`../shared/kuberay-crds`), or where
# RAYGEN_KUBERAY_CRDS says.
CRDS = Path(os.environ.get("RAYGEN_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
SECRET = "wJalrXUtnFEMI-test-secret-value"


@cache
def crd_schema(kind: str) -> dict:
    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"KubeRay's CRDs are not at {CRDS}: set RAYGEN_KUBERAY_CRDS to their folder.")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def schema_errors(manifest: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(manifest["kind"]))
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(manifest)]


def rendered(*args: str, cwd: Path = ROOT) -> list[dict]:
    """The manifests `raygen k8s render ARGS` writes, each a valid KubeRay resource."""
    done = raygen("k8s", "render", *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout  # the environment's credentials stay out
    manifests = list(yaml.safe_load_all(done.stdout))
    for manifest in manifests:
        if manifest["kind"] in CRD_FILES:
            assert schema_errors(manifest) == [], manifest["kind"]
    return manifests


@pytest.fixture(autouse=True)
def credentials_in_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("RAY_AUTH_TOKEN", SECRET)


def test_the_validator_refuses_what_kuberay_would():
    (cluster,) = rendered("cluster")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = [{}]
    errors = schema_errors(cluster)
    assert any("'four' is not of type 'integer'" in e for e in errors)
    assert any("'containerPort' is a required property" in e for e in errors)


def test_a_training_run_is_a_rayjob_on_gpu_pods_with_its_spec_mounted():
    from raygen.jobs.spec import TrainSpec

    spec = ROOT / "jobs" / "examples" / "llama-7b-zero3.yaml"
    config_map, job = rendered(
        "train", str(spec), "--set", "run.storage=s3://bucket/runs", "--namespace", "ml",
        "--set", "scaling.accelerator_type=A100",
        "--node-selector", "cloud.google.com/gke-accelerator=nvidia-tesla-a100",
    )  # fmt: skip
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "RayJob"
    assert {config_map["metadata"]["namespace"], job["metadata"]["namespace"]} == {"ml"}
    trained = TrainSpec.model_validate(yaml.safe_load(config_map["data"]["spec.yaml"]))
    assert trained.run.storage == "s3://bucket/runs" and trained.scaling.num_workers == 32
    assert job["spec"]["entrypoint"] == "raygen train /etc/raygen/spec.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "raygen-ray-token"}
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs no training
    (volume,) = head["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert head["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == (
        "/etc/raygen"
    )
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 32
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["image"].endswith("-cuda")
    assert worker["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert worker["envFrom"] == [
        {"secretRef": {"name": "raygen-cloud-credentials", "optional": True}}
    ]
    assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # The group's GPU model, for the autoscaler, and the nodes it goes to.
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {
        "accelerator_type:A100": 1
    }
    assert group["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100"
    }


def test_a_run_whose_storage_pods_would_lose_is_refused():
    spec = ROOT / "jobs" / "examples" / "llama-7b-zero3.yaml"
    done = raygen("k8s", "render", "train", str(spec))
    assert done.returncode == 2
    assert "`run.storage`: '/mnt/shared/raygen-runs' is a local path" in done.stderr
    assert "--set run.storage=s3://BUCKET/runs (or gs://, abfs://)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_sweep_is_a_rayjob_with_its_base_spec_beside_it_and_room_for_its_trials():
    spec = ROOT / "tuning" / "examples" / "code-lm-lr.yaml"
    config_map, job = rendered(
        "tune", str(spec), "--set", "run.storage=gs://bucket/sweeps",
        "--set", "max_concurrent_trials=3", "--image", "registry.example/raygen:1",
    )  # fmt: skip
    assert set(config_map["data"]) == {"sweep.yaml", "base.yaml"}
    sweep = yaml.safe_load(config_map["data"]["sweep.yaml"])
    assert sweep["base"] == "base.yaml" and sweep["run"]["storage"] == "gs://bucket/sweeps"
    assert job["spec"]["entrypoint"] == "raygen tune /etc/raygen/sweep.yaml"
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    workers = yaml.safe_load(config_map["data"]["base.yaml"])["scaling"]["num_workers"]
    assert group["minReplicas"] == workers and group["maxReplicas"] == 3 * workers
    assert group["template"]["spec"]["containers"][0]["image"] == "registry.example/raygen:1"


def test_a_cluster_to_submit_to_autoscales_between_its_bounds():
    (cluster,) = rendered(
        "cluster", "--name", "team-a", "--min-workers", "2", "--max-workers", "10",
        "--worker-cpus", "16", "--worker-gpus", "1",
    )  # fmt: skip
    assert cluster["kind"] == "RayCluster" and cluster["metadata"]["name"] == "team-a"
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 10)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"}
    ports = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["containerPort"] for p in ports} == {6379, 8265, 10001, 8000}


def test_a_deployment_is_a_rayservice_whose_serve_config_passed_the_gate(s3_endpoint, tmp_path):
    import boto3
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from raygen.cluster.storage import upload_dir
    from raygen.serving.spec import DeploySpec

    # An untrained small GPT-2 with a tokenizer: what the gate checks is its files.
    weights = tmp_path / "model"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x\n"] * 8, vocab_size=300)
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(weights)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(
        weights
    )
    boto3.client("s3").create_bucket(Bucket="models")
    model = "s3://models/code-lm/model"
    upload_dir(str(weights), model)
    spec = tmp_path / "deploy.yaml"
    raw = {
        "name": "code-lm", "model": model, "audit": "s3://models/code-lm/audit.json",
        "http": {"host": "0.0.0.0"}, "auth": {"api_keys_env": "CODE_LM_KEYS"},
        "autoscaling": {"min_replicas": 1, "max_replicas": 4},
    }  # fmt: skip
    spec.write_text(yaml.safe_dump({**raw, "model": str(weights)}))
    local = raygen("k8s", "render", "serve", str(spec), "--override-audit", "demo")
    assert local.returncode == 2 and "a local path: the pods cannot read it" in local.stderr
    spec.write_text(yaml.safe_dump({**raw, "http": {"host": "127.0.0.1"}}))
    loopback = raygen("k8s", "render", "serve", str(spec), "--override-audit", "demo")
    assert loopback.returncode == 2 and "set http.host: 0.0.0.0" in loopback.stderr
    spec.write_text(yaml.safe_dump(raw))
    refused = raygen("k8s", "render", "serve", str(spec))
    assert refused.returncode == 3 and "refused by its audit" in refused.stderr
    unkeyed = raygen("k8s", "render", "serve", str(spec), "--override-audit", "demo")
    assert unkeyed.returncode == 2 and "--api-keys-secret" in unkeyed.stderr
    (service,) = rendered(
        "serve", str(spec), "--override-audit", "demo", "--api-keys-secret", "code-lm-keys"
    )
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "raygen.serving.router:build_app"
    deployed = DeploySpec.model_validate(app["args"])
    assert deployed.model == model and deployed.audit_override is not None  # on the record
    cluster = service["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 4)
    env = group["template"]["spec"]["containers"][0]["env"]
    keys = {"secretKeyRef": {"name": "code-lm-keys", "key": "keys"}}
    assert {"name": "CODE_LM_KEYS", "valueFrom": keys} in env
