"""Deploy, inspect and remove raygen applications on Ray Serve; write Serve config files.

The deploy path: validate the spec and the model (before asking the cluster for
anything) -> start Serve's HTTP proxy -> run the application -> wait until it answers.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from raygen.cluster.storage import is_remote
from raygen.jobs.errors import SpecError
from raygen.serving.errors import AuditFailed, DeployError
from raygen.serving.spec import CANARY, PRIMARY, DeploySpec, arm_specs, with_arm

logger = logging.getLogger(__name__)

# The ingress deployment of raygen's applications (serving/router.py), and of those of
# raygen's earlier versions.
INGRESSES = (PRIMARY, "router", "model")
ROLLOUT = "rollout"  # the judge of a canary rollout


def resolve_deploy_spec(spec: DeploySpec, source: str, embedded: bool = True) -> DeploySpec:
    """Check a deploy spec against its model(s) and this machine; return it with each
    model's local path made absolute (replicas do not share the caller's working directory)
    and registered versions resolved.

    Raises:
        SpecError: every problem found, each naming its key.
        AuditFailed: a registered version with no audit on record, and none given.
    """
    problems: list[str] = []
    resolved, kinds = spec, {}
    for arm, armed in arm_specs(spec).items():
        armed, kinds[arm] = _resolve_arm(armed, "" if arm == PRIMARY else "canary.", problems)
        resolved = with_arm(resolved, arm, armed)
    arms = arm_specs(resolved)
    if CANARY in arms and arms[CANARY].model == arms[PRIMARY].model:
        problems.append(
            f"`canary.model` is {arms[CANARY].model}, the primary's own model: a canary tries "
            "another model; give its directory, URI or registered version."
        )
    if len(set(kinds.values()) - {None}) > 1:
        problems.append(
            f"`canary.model` is a {kinds[CANARY]} model and `model` a {kinds[PRIMARY]} one: a "
            "canary answers the same requests as the model it may replace, so it must be the "
            "same kind."
        )
    replica = spec.replica
    if replica.precision == "fp16" and replica.num_gpus == 0:
        problems.append(
            "`replica.precision`: fp16 needs a GPU (set replica.num_gpus) ; use fp32 or bf16 "
            "on CPU."
        )
    name = spec.auth.api_keys_env
    if name and embedded and not os.environ.get(name, "").strip():
        problems.append(
            f"`auth.api_keys_env`: {name} is not set here; export {name}=key1,key2 (the API "
            "keys clients must send) or remove `auth` to serve without keys."
        )
    if problems:
        raise SpecError(source, problems)
    for armed in arms.values():
        if not is_remote(armed.model) and not embedded:
            logger.warning(
                "model %s is a local path: every node of the cluster must see it there; use "
                "an s3:// URI for a multi-node cluster.",
                armed.model,
            )
    return resolved


def _resolve_arm(spec: DeploySpec, key: str, problems: list[str]) -> tuple[DeploySpec, str | None]:
    """One arm's spec with its model and audit resolved, and its model's kind (None when it
    cannot be told); adds what is wrong to `problems`, naming keys under `key`."""
    from raygen.serving.runtimes.common import detect_kind

    spec = _resolve_registered(spec, key)
    model = spec.model if is_remote(spec.model) else str(Path(spec.model).resolve())
    kind = None
    try:
        kind = detect_kind(model)
    except SpecError as exc:
        problems += [f"`{key}model`: {p}" for p in exc.problems]
    audit = spec.audit
    if audit is None:
        problems.append(
            f"`{key}audit`: missing; every deployment is gated by an audit of its model: give "
            "an audit spec (YAML, run before deploying) or the audit.json of a passed "
            "`raygen audit` of this model."
        )
    elif not (audit.endswith(".json") or audit.endswith((".yaml", ".yml"))):
        problems.append(
            f"`{key}audit`: {audit} is neither an audit spec (.yaml) nor an audit.json."
        )
    elif not is_remote(audit):
        audit = str(Path(audit).resolve())
    return spec.model_copy(update={"model": model, "audit": audit}), kind


def _resolve_registered(spec: DeploySpec, key: str = "") -> DeploySpec:
    """A spec whose `model` names a registered version, with the version's model directory
    in its place and, unless the spec names one, the version's last audit as its gate.

    Raises:
        SpecError: no such version, or its model directory is not reachable from here.
        AuditFailed: the version has no audit on record, and the spec names none.
    """
    from raygen.jobs.registry import is_registered, resolve_model

    if not is_registered(spec.model):
        return spec
    version = resolve_model(spec.model)
    audit = spec.audit or version.tags.get("audit.report")
    if audit is None:
        raise AuditFailed(
            f"deployment of {spec.name} refused: {spec.model} ({version.ref}) has no audit on "
            f"record. Audit it first: raygen audit AUDIT_SPEC --model {version.ref} (or give "
            f"`{key}audit` in the deploy spec). Nothing was deployed."
        )
    return spec.model_copy(
        update={"model": version.model, "registered_version": version.ref, "audit": audit}
    )


def http_options(spec: DeploySpec) -> dict[str, Any]:
    """Serve's HTTP proxy options. The proxy is shared by every application on a cluster:
    the first deployment's options hold until Serve is shut down."""
    http = spec.http
    return {"host": http.host, "port": http.port, "request_timeout_s": http.request_timeout_s}


def url_of(spec: DeploySpec) -> str:
    host = spec.http.host if spec.http.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{spec.http.port}{spec.route_prefix.rstrip('/')}"


def deploy(
    spec: DeploySpec, embedded: bool, on_event: Callable[[str], None] = logger.info
) -> dict[str, Any]:
    """Run the application on the connected Ray and wait until its replicas are up.

    An application of that name already running is updated in place: its replicas keep
    answering until new ones have loaded the model and passed the gate, then finish what
    they have (`updates` in the spec). If the update fails, the application is put back as
    it was.

    Returns:
        {"name", "url", "model_sha256", "kind", "replicas", "deploy_s", "replaced"}, where
        `replaced` is {"model", "model_sha256"} of the model updated away from, or None.

    Raises:
        DeployError: Serve could not start the application (the replica's error named), or
            the name belongs to an application raygen did not deploy.
    """
    from ray import serve

    from raygen.serving.router import application
    from raygen.serving.runtimes.common import detect_kind

    started = time.monotonic()
    serve.start(http_options=http_options(spec))
    running = _running(spec.name)
    if running is not None:
        on_event(
            f"{spec.name} is running ({running.get('model', 'its model')}): updating it in place; "
            "its replicas answer until the new ones have loaded the model and passed the gate"
        )
    try:
        serve.run(application(spec), name=spec.name, route_prefix=spec.route_prefix)
    except RuntimeError as exc:
        reason = _replica_error(_deployment_message(spec.name) or str(exc))
        if running is None:
            _delete_quietly(spec.name)
            raise DeployError(f"{spec.name} failed to start: {reason}") from None
        raise DeployError(
            f"the update of {spec.name} failed: {reason}. {_restore(spec.name, running)}"
        ) from None
    url = url_of(spec)
    if embedded and spec.autoscaling.min_replicas > 0:
        _wait_answering(url + "/healthz")
    from raygen.jobs.model_hash import model_sha256

    replaced = None
    if running is not None:
        replaced = {"model": running.get("model"), "model_sha256": running.get("model_sha256")}
    canary = None
    if spec.canary is not None:
        canary = {
            "model": spec.canary.model,
            "model_sha256": model_sha256(spec.canary.model),
            "traffic_percent": spec.canary.traffic_percent,
            "replicas": replica_counts(spec.name, CANARY),
        }
    return {
        "name": spec.name,
        "url": url,
        "model_sha256": model_sha256(spec.model),
        "kind": detect_kind(spec.model),
        "replicas": replica_counts(spec.name),
        "deploy_s": time.monotonic() - started,
        "replaced": replaced,
        "canary": canary,
    }


def _running(name: str) -> dict[str, Any] | None:
    """What the running application `name` serves ({"spec", "model", "model_sha256"}; only
    {} when its replicas cannot say), or None when no application has that name.

    Raises:
        DeployError: an application of that name runs that raygen did not deploy.
    """
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return None
    if not set(INGRESSES) & set(app.deployments):
        raise DeployError(
            f"An application named {name!r} runs on this cluster, and raygen did not deploy "
            "it: give the deploy spec another `name`, or remove it first (`serve shutdown`)."
        )
    return _about(name) or {}  # no replica answers: update it all the same


def _about(name: str) -> dict[str, Any] | None:
    """A primary replica's account of a running application (`PrimaryServer.about`): its
    spec, each arm's model and figures, the canary's share, the rollout's decision; None
    (warned about) when none answers."""
    from ray import serve

    try:
        return serve.get_app_handle(name).about.remote().result(timeout_s=30)
    except Exception as exc:  # noqa: BLE001 - the callers go on with what they have
        logger.warning("%s: its replicas did not say what it serves: %s", name, exc)
        return None


def _restore(name: str, running: dict[str, Any]) -> str:
    """Put back the application an update failed to replace; says how that went."""
    from ray import serve

    from raygen.serving.router import application

    if "spec" not in running:
        return "Its old replicas may still answer: see `raygen serve status`."
    before = DeploySpec.model_validate(running["spec"])
    try:
        serve.run(application(before), name=name, route_prefix=before.route_prefix)
    except RuntimeError as exc:
        reason = _replica_error(_deployment_message(name) or str(exc))
        return f"Putting back {before.model} failed too: {reason}; see `raygen serve status`."
    return f"It serves {before.model} again, as before; nothing else changed."


def _deployment_message(name: str) -> str:
    """What Serve says went wrong with an application's deployments ("" if nothing)."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return ""
    messages = [d.message for d in app.deployments.values() if d.message]
    return "\n".join(messages) or app.message or ""


def block(spec: DeploySpec, on_event: Callable[[str], None]) -> None:
    """Serve until interrupted, reporting replica count changes."""
    last = None
    while True:
        counts = replica_counts(spec.name)
        running = counts.get("RUNNING", 0)
        if running != last:
            on_event(f"{spec.name}: {running} replica(s) running")
            last = running
        time.sleep(1)


def serve(
    spec: DeploySpec,
    source: str,
    address: str | None,
    override_audit: str | None,
    detach: bool,
    on_event: Callable[[str], None],
    on_deployed: Callable[[dict[str, Any], DeploySpec, str], None],
) -> None:
    """`raygen serve SPEC`: resolve the spec, connect, pass the audit gate, deploy and
    record the deployment (`on_deployed(info, spec, record)`); then, unless `detach`,
    serve until Ctrl-C or SIGTERM and tear the application down.

    Raises:
        DeployError: `detach` without a cluster to leave the application on.
        AuditFailed: the gate refused the model.
    """
    import signal

    from raygen.cluster.connection import connect
    from raygen.serving.gate import gate_arms, record_deployment

    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    if detach and embedded:
        raise DeployError(
            "--detach needs a running Ray cluster to leave the app on: give --address (or "
            "RAY_ADDRESS), e.g. after `ray start --head`; without --detach, raygen serves "
            "on a local Ray until Ctrl-C."
        )
    resolved = resolve_deploy_spec(spec, source, embedded=embedded)
    connect(address)
    # SIGTERM (containers, process managers) tears down like Ctrl-C does; set after
    # connecting, as Ray installs a SIGTERM handler of its own there.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    gated = gate_arms(resolved, override_audit, address, on_event=on_event)
    try:
        info = deploy(gated, embedded=embedded, on_event=on_event)
        on_deployed(info, gated, record_deployment(gated, info))
        if detach:
            return
        block(gated, on_event)
    except KeyboardInterrupt:
        on_event(f"shutting down {gated.name}")
        teardown(gated.name, embedded)
        raise


def teardown(name: str, embedded: bool) -> None:
    """Delete the application (and Serve itself on an embedded Ray)."""
    from ray import serve

    _delete_quietly(name)
    if embedded:
        serve.shutdown()


def replica_counts(name: str, arm: str = PRIMARY) -> dict[str, int]:
    """Replicas of one arm's model deployment by state (RUNNING, STARTING, ...)."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None or arm not in app.deployments:
        return {}
    return {
        str(k.value if hasattr(k, "value") else k): v
        for k, v in app.deployments[arm].replica_states.items()
    }


def status() -> list[dict[str, Any]]:
    """Every application Serve runs on the connected cluster."""
    from ray import serve

    rows = []
    for name, app in serve.status().applications.items():
        rows.append(
            {
                "name": name,
                "status": str(getattr(app.status, "value", app.status)),
                "deployed": time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(app.last_deployed_time_s)
                ),
                "replicas": replica_counts(name),
                "message": app.message or _deployment_message(name),
                "serving": _serving(name) if PRIMARY in app.deployments else None,
            }
        )
    return rows


def _serving(name: str) -> dict[str, Any] | None:
    """What `raygen serve status` shows of an application's arms: `_about` but the spec."""
    about = _about(name)
    if about is not None:
        about.pop("spec", None)
    return about


def decide(name: str, action: str) -> dict[str, Any]:
    """`raygen serve promote|rollback NAME`: decide a canary rollout by hand; returns the
    decision, with the figures behind it.

    Raises:
        DeployError: no such application, or it has no rollout to decide.
    """
    from ray import serve

    from raygen.serving.gate import user_name

    _require_running(name)
    if ROLLOUT not in serve.status().applications[name].deployments:
        raise DeployError(
            f"{name} has no canary rollout to decide (no canary); deploy a spec with `canary` "
            "to start one."
        )
    try:
        handle = serve.get_deployment_handle(ROLLOUT, name)
        decision = handle.decide.remote(action, user_name()).result(timeout_s=60)
    except Exception as exc:  # noqa: BLE001 - a judge that is gone
        raise DeployError(
            f"{name}'s rollout did not take the decision: "
            f"{_replica_error(str(exc) or repr(exc))}; see `raygen serve status`."
        ) from None
    if "error" in decision:
        raise DeployError(decision["error"])
    return decision


def _require_running(name: str) -> None:
    """Raises DeployError naming the applications that do run, unless `name` is one."""
    from ray import serve

    names = list(serve.status().applications)
    if name not in names:
        running = ", ".join(names) or "none"
        raise DeployError(f"No application named {name!r} is running (running: {running}).")


def shutdown(name: str) -> None:
    """Delete one application.

    Raises:
        DeployError: no application of that name runs here (the ones that do are named).
    """
    from ray import serve

    _require_running(name)
    serve.delete(name)


def serve_config(spec: DeploySpec) -> dict[str, Any]:
    """The Ray Serve config of a deploy spec (for `serve deploy` or a KubeRay RayService's
    serveConfigV2): the application's builder and the spec as its arguments."""
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(spec),
        "applications": [
            {
                "name": spec.name,
                "route_prefix": spec.route_prefix,
                "import_path": "raygen.serving.router:build_app",
                "args": spec.model_dump(mode="json"),
            }
        ],
    }


def write_serve_config(spec: DeploySpec, out: Path) -> dict[str, Any]:
    """Write a Ray Serve config file (for `serve deploy` or a KubeRay RayService)."""
    config = serve_config(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Ray Serve config written by `raygen serve build`; deploy with `serve deploy FILE`\n"
        "# or paste `applications` into a KubeRay RayService's serveConfigV2.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return config


def _wait_answering(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise DeployError(
                    f"The application runs, but {url} does not answer ({exc}). Serve's HTTP "
                    "proxy may already listen on another host/port (started earlier on this "
                    "cluster): check `http` in the spec, or `serve shutdown` first."
                ) from None
        time.sleep(0.5)


def _delete_quietly(name: str) -> None:
    from ray import serve

    try:
        serve.delete(name)
    except Exception as exc:  # tearing down after a failure: report the first error only
        logger.warning("could not delete %s: %s", name, exc)


def _replica_error(message: str) -> str:
    """The user-facing line of Serve's deploy failure (the replica's exception), not its
    traceback."""
    import re

    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.match(r"^[\w.]*(?:Error|Exception|Failed): (.*)$", line)
        if match:
            return match.group(1)
    return lines[-1] if lines else message
