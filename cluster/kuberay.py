"""KubeRay manifests for raygen's commands: a `RayJob` per training run or sweep, a
`RayService` per deployment, a `RayCluster` to submit to (`raygen k8s render`).

Each is a KubeRay `ray.io/v1` resource checked against KubeRay v1.7.0's CRD schemas by the
tests. Pods run raygen's container image (`cluster/images/`) as its non-root user; Ray's token
authentication is on (KubeRay's `authOptions`: the operator gives every pod the token from
a Kubernetes Secret), and the cloud credentials and serving API keys come from Secrets too:
a manifest names Secrets, never holds their values. A job's spec travels in a ConfigMap
rendered beside it, mounted where the entrypoint reads it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml

API_VERSION = "ray.io/v1"
# What `docker build -f cluster/images/Dockerfile -t raygen:latest .` makes (the CUDA one:
# raygen:latest-cuda); pushed to a registry, `--image` names it there.
IMAGE = "raygen:latest"
RAY_VERSION = "2.60.0"
SPEC_DIR = "/etc/raygen"
HOME = "/home/raygen"
UID = 1000  # the image's user
# The Secrets a manifest refers to, created by the cluster's administrator: Ray's token
# (key `auth_token`, KubeRay's), and the cloud's credentials as environment variables.
TOKEN_SECRET = "raygen-ray-token"
CREDENTIALS_SECRET = "raygen-cloud-credentials"  # AWS_*, GOOGLE_*, AZURE_STORAGE_* variables
HEAD_CPUS, HEAD_MEMORY = "2", "8Gi"
MEMORY_PER_CPU_GI = 4


def name_of(*parts: str) -> str:
    """A Kubernetes object name (DNS-1123 label, at most 63 characters) from `parts`."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    return name[:63].rstrip("-") or "raygen"


def _env(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every container's environment beside what KubeRay adds (Ray's token)."""
    return [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}, *(extra or [])]


def _container(name: str, image: str, resources: dict[str, Any], env: list, **more: Any) -> dict:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        # The cloud's credentials as environment variables, where the Secret exists (a
        # workload or managed identity needs none).
        "envFrom": [{"secretRef": {"name": CREDENTIALS_SECRET, "optional": True}}],
        "resources": {"requests": resources, "limits": resources},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
        **more,
    }


def _pod(container: dict[str, Any], node_selector: dict[str, str] | None = None,
         volumes: list | None = None) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "fsGroup": UID},
        "containers": [container],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    if volumes:
        spec["volumes"] = volumes
    return {"spec": spec}


def cluster_spec(
    image: str,
    workers: int,
    max_workers: int,
    worker_cpus: float,
    worker_gpus: int = 0,
    accelerator: str | None = None,
    config_map: str | None = None,
    env: list[dict[str, Any]] | None = None,
    serve: bool = False,
    node_selector: dict[str, str] | None = None,
    serve_port: int = 8000,
) -> dict[str, Any]:
    """A RayCluster's spec: a head that runs no work (0 CPUs for Ray), and one autoscaled
    group of workers with `worker_cpus` (and `worker_gpus` of the model `accelerator`) each,
    on the Kubernetes nodes `node_selector` picks (GPU node labels differ by platform: GKE's
    cloud.google.com/gke-accelerator, NVIDIA's nvidia.com/gpu.product...). `config_map` is
    mounted at SPEC_DIR on the head, where a job's entrypoint runs."""
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    if serve:
        ports.append({"containerPort": serve_port, "name": "serve"})
    mounts, volumes = [], []
    if config_map:
        mounts = [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]
        volumes = [{"name": "spec", "configMap": {"name": config_map}}]
    head = _container(
        "ray-head", image, {"cpu": HEAD_CPUS, "memory": HEAD_MEMORY}, _env(env),
        ports=ports, volumeMounts=mounts,
    )  # fmt: skip
    cpus = max(1, math.ceil(worker_cpus))
    resources: dict[str, Any] = {"cpu": str(cpus), "memory": f"{cpus * MEMORY_PER_CPU_GI}Gi"}
    if worker_gpus:
        resources["nvidia.com/gpu"] = str(worker_gpus)
    start: dict[str, str] = {}
    if accelerator:  # so the autoscaler knows this group's GPU model before any pod runs
        start["resources"] = json.dumps(json.dumps({f"accelerator_type:{accelerator}": 1}))
    worker = _container("ray-worker", image, resources, _env(env))
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": TOKEN_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60},
        "headGroupSpec": {
            # The head schedules no work: a run's workers and a deployment's replicas go
            # to the worker pods, which the autoscaler adds and removes.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(head, volumes=volumes),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers" if worker_gpus else "workers",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": max(workers, max_workers),
                "rayStartParams": start,
                "template": _pod(worker, node_selector),
            }
        ],
    }


def _metadata(name: str, namespace: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/managed-by": "raygen"}
    return {"name": name, "namespace": namespace, "labels": labels}


def job_manifests(
    command: str,
    spec_name: str,
    files: dict[str, str],
    scaling: Any,
    image: str,
    namespace: str,
    max_workers: int | None = None,
    node_selector: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A ConfigMap holding the spec `files` (the first is the one run) and a RayJob running
    `raygen COMMAND` on it (`train` or `tune`) on its own autoscaling cluster, deleted when
    the job ends. `scaling` is the train spec's ScalingSpec: one worker pod per training
    worker, up to `max_workers` (a sweep's trials at once)."""
    name = name_of(spec_name, command)
    per_worker = scaling.resources_per_worker or {}
    gpus = int(per_worker.get("GPU", 1 if scaling.use_gpu else 0))
    cpus = per_worker.get("CPU", 8 if gpus else 4)
    config_map = name_of(spec_name, command, "spec")
    cluster = cluster_spec(
        image, scaling.num_workers, max_workers or scaling.num_workers, cpus, gpus,
        scaling.accelerator_type, config_map, node_selector=node_selector,
    )  # fmt: skip
    job = {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(name, namespace),
        "spec": {
            "entrypoint": f"raygen {command} {SPEC_DIR}/{next(iter(files))}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": cluster,
        },
    }
    metadata = _metadata(config_map, namespace)
    spec_files = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": files}
    return [spec_files, job]


def service_manifest(
    serve_config: dict[str, Any],
    spec: Any,
    image: str,
    namespace: str,
    api_keys_secret: str | None = None,
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A RayService serving `serve_config` (what `raygen serve build` writes, the audit
    gate passed) on an autoscaling cluster sized for the deploy spec's replicas. The API
    keys, when the spec names their variable, come from `api_keys_secret`."""
    replica = spec.replica
    max_replicas = spec.autoscaling.max_replicas * (2 if spec.canary else 1)
    env = []
    if api_keys_secret:
        key = {"secretKeyRef": {"name": api_keys_secret, "key": "keys"}}
        env.append({"name": spec.auth.api_keys_env, "valueFrom": key})
    cluster = cluster_spec(
        image, max(1, spec.autoscaling.min_replicas), max_replicas,
        max(1.0, replica.num_cpus), math.ceil(replica.num_gpus), replica.accelerator_type,
        env=env, serve=True, node_selector=node_selector, serve_port=spec.http.port,
    )  # fmt: skip
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(name_of(spec.name), namespace),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }


def cluster_manifest(
    name: str, image: str, namespace: str, min_workers: int, max_workers: int,
    worker_cpus: float, worker_gpus: int = 0, accelerator: str | None = None,
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A long-lived autoscaling RayCluster to `raygen submit` jobs to (through its
    dashboard's Jobs API: port-forward `svc/NAME-head-svc 8265`)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(name_of(name), namespace),
        "spec": cluster_spec(
            image,
            min_workers,
            max_workers,
            worker_cpus,
            worker_gpus,
            accelerator,
            serve=True,
            node_selector=node_selector,
        ),  # fmt: skip
    }


def dump(manifests: list[dict[str, Any]]) -> str:
    """Manifests as one multi-document YAML file, for `kubectl apply -f`."""
    return "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in manifests)
