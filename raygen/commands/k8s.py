"""`raygen k8s render`: KubeRay manifests for a training run, a sweep, a deployment or a
cluster."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from raygen import render
from raygen.commands.common import OverrideOption, SetOption, setup_logging


class Kind(str, enum.Enum):
    train = "train"
    tune = "tune"
    serve = "serve"
    cluster = "cluster"


def render_manifests(
    kind: Annotated[Kind, typer.Argument(help="train, tune or serve (with SPEC), or cluster.")],
    spec: Annotated[Path | None, typer.Argument(help="The train, sweep or deploy spec.")] = None,
    image: Annotated[
        str | None, typer.Option(help="Container image (default: raygen's, CUDA for GPUs).")
    ] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "default",
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write (default: stdout).")
    ] = None,
    set_: SetOption = None,
    override_audit: OverrideOption = None,
    api_keys_secret: Annotated[
        str | None,
        typer.Option(help="serve: the Secret (key `keys`) with the API keys of auth.api_keys_env."),
    ] = None,
    name: Annotated[str, typer.Option(help="cluster: its name.")] = "raygen",
    min_workers: Annotated[int, typer.Option(help="cluster: worker pods at least.")] = 1,
    max_workers: Annotated[
        int | None, typer.Option(help="Worker pods at most (default: the spec's).")
    ] = None,
    worker_cpus: Annotated[float, typer.Option(help="cluster: CPUs per worker pod.")] = 4,
    worker_gpus: Annotated[int, typer.Option(help="cluster: GPUs per worker pod.")] = 0,
    accelerator_type: Annotated[
        str | None, typer.Option(help="cluster: the GPU model of the worker pods (A100...).")
    ] = None,
    node_selector: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE of the Kubernetes nodes worker pods go to (repeatable)."),
    ] = None,
) -> None:
    """Write KubeRay manifests: a RayJob (with its spec in a ConfigMap) for `train` and
    `tune`, a RayService for `serve` (its serveConfigV2 what `raygen serve build` writes,
    after the audit gate), a RayCluster for `cluster`. Secrets are referred to by name:
    `raygen-ray-token` (Ray's token, key `auth_token`), `raygen-cloud-credentials` (the
    cloud's variables, optional), and --api-keys-secret."""
    from raygen.cluster import kuberay
    from raygen.jobs.errors import SpecError
    from raygen.jobs.run_dir import durable_storage_problem

    setup_logging()
    gpu = worker_gpus > 0
    selector = _selector(node_selector or [])
    if kind is not Kind.cluster and spec is None:
        raise typer.BadParameter(f"{kind.value} needs SPEC: the {kind.value} spec (YAML).")
    if kind is Kind.train:
        from raygen.jobs.loader import load_spec
        from raygen.jobs.spec import TrainSpec
        from raygen.jobs.validate import portable_problems

        train = load_spec(TrainSpec, spec, set_)
        problems = portable_problems(train) + [
            p for p in [durable_storage_problem("run.storage", train.run.storage, pods=True)] if p
        ]
        if problems:
            raise SpecError(str(spec), problems)
        gpu = train.scaling.use_gpu
        files = {"spec.yaml": yaml.safe_dump(train.model_dump(mode="json"), sort_keys=False)}
        manifests = kuberay.job_manifests(
            "train", train.name, files, train.scaling, _image(image, gpu), namespace,
            max_workers, selector,
        )  # fmt: skip
    elif kind is Kind.tune:
        from raygen.jobs.spec import TrainSpec
        from raygen.tuning.validate import load_sweep

        sweep, base_raw = load_sweep(spec, set_)
        problem = durable_storage_problem("run.storage", sweep.run.storage, pods=True)
        if problem:
            raise SpecError(str(spec), problem)
        base = TrainSpec.model_validate(base_raw)
        gpu = base.scaling.use_gpu
        at_once = sweep.max_concurrent_trials or 1
        sweep_raw = {**sweep.model_dump(mode="json"), "base": "base.yaml"}
        files = {
            "sweep.yaml": yaml.safe_dump(sweep_raw, sort_keys=False),
            "base.yaml": yaml.safe_dump(base_raw, sort_keys=False),
        }
        manifests = kuberay.job_manifests(
            "tune", sweep.name, files, base.scaling, _image(image, gpu), namespace,
            max_workers or base.scaling.num_workers * at_once, selector,
        )  # fmt: skip
    elif kind is Kind.serve:
        from raygen.jobs.loader import load_spec
        from raygen.serving.deploy import resolve_deploy_spec, serve_config
        from raygen.serving.gate import gate_arms
        from raygen.serving.spec import DeploySpec

        deploy = load_spec(DeploySpec, spec, set_)
        problems = _pod_problems(deploy)
        if problems:
            raise SpecError(str(spec), problems)
        resolved = resolve_deploy_spec(deploy, str(spec), embedded=False)
        gated = gate_arms(resolved, override_audit, None, on_event=render.plain)
        if gated.auth.api_keys_env and not api_keys_secret:
            raise SpecError(
                str(spec),
                f"`auth.api_keys_env` is {gated.auth.api_keys_env}: name the Secret that holds "
                "the keys (key `keys`, comma-separated) with --api-keys-secret.",
            )
        gpu = gated.replica.num_gpus > 0
        manifests = [
            kuberay.service_manifest(
                serve_config(gated),
                gated,
                _image(image, gpu),
                namespace,
                api_keys_secret,
                selector,
            )  # fmt: skip
        ]
    else:
        manifests = [
            kuberay.cluster_manifest(
                name, _image(image, gpu), namespace, min_workers, max_workers or min_workers,
                worker_cpus, worker_gpus, accelerator_type, selector,
            )
        ]  # fmt: skip
    text = kuberay.dump(manifests)
    if out_path is None:
        typer.echo(text, nl=False)
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    kinds = ", ".join(m["kind"] for m in manifests)
    render.out.print(f"wrote {out_path} ({kinds}); apply it with `kubectl apply -f {out_path}`")


def _pod_problems(deploy: Any) -> list[str]:
    """What a deploy spec says that pods cannot do: read local files, or take requests from
    a Kubernetes Service on the loopback interface."""
    from raygen.cluster.storage import is_remote
    from raygen.jobs.registry import is_registered
    from raygen.serving.spec import arm_specs

    problems = []
    for prefix, armed in zip(("", "canary."), arm_specs(deploy).values(), strict=False):
        for key, path in ((f"{prefix}model", armed.model), (f"{prefix}audit", armed.audit)):
            if path and not is_remote(path) and not is_registered(path):
                problems.append(
                    f"`{key}`: {path!r} is a local path: the pods cannot read it. Give a bucket "
                    "URI (s3://, gs://, abfs://) or a registered models:/ version."
                )
    if deploy.http.host in ("127.0.0.1", "localhost", "::1"):
        problems.append(
            f"`http.host`: {deploy.http.host} is the pod's loopback, which the Kubernetes "
            "Service cannot reach: set http.host: 0.0.0.0 (with auth.api_keys_env, or "
            "auth.allow_anonymous: true)."
        )
    return problems


def _selector(pairs: list[str]) -> dict[str, str]:
    selector = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise typer.BadParameter(f"{pair!r}: write KEY=VALUE.", param_hint="--node-selector")
        selector[key] = value
    return selector


def _image(image: str | None, gpu: bool) -> str:
    from raygen.cluster.kuberay import IMAGE

    return image or (IMAGE + "-cuda" if gpu else IMAGE)
