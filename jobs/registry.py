"""The model registry, in MLflow: exported models as versions of registered models, each
carrying the model's sha256, its run and data, its audits and its deployments. A version is
named `models:/NAME/VERSION`, or `models:/NAME@ALIAS` (`serving`: the version deployed last).

raygen serves, audits and traces a version from the model directory it registered (the
version's `raygen.model` tag); the version's MLflow `source` is that directory too, except
for a local directory registered on a tracking server (a server may not point at a client's
disk): then the model is uploaded to the run's artifacts and the source is `runs:/…/model`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raygen.cluster.storage import exists, is_remote, join, read_text, write_text
from raygen.jobs.errors import SpecError

logger = logging.getLogger(__name__)

MODELS_PREFIX = "models:/"
REGISTRY_FILE = "registry.json"  # in a run dir: the versions its model was registered as
SERVING_ALIAS = "serving"  # set on a version each time it is deployed

MODEL_TAG = "raygen.model"  # the model directory (or URI) raygen registered
SHA256_TAG = "raygen.model_sha256"
RUN_DIR_TAG = "raygen.run_dir"
FINGERPRINT_TAG = "raygen.data_fingerprint"
AUDIT_PREFIX = "audit."  # audit.passed, audit.failing, audit.report, audit.model_sha256, ...
DEPLOYMENT_PREFIX = "deployment."  # deployment.<app name>: the last deployment record
ROLLOUT_PREFIX = "rollout."  # rollout.<app name>: the last canary decision it took part in

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def is_registered(model: str) -> bool:
    return model.startswith(MODELS_PREFIX)


def registry_uri(explicit: str | None = None, storage: str = "runs") -> str:
    """The store of the registry: `explicit`, else MLFLOW_REGISTRY_URI or
    MLFLOW_TRACKING_URI, else the embedded store under `storage` (the default run.storage)."""
    from raygen.jobs.spec import TrackingSpec
    from raygen.jobs.tracking import tracking_target

    explicit = explicit or os.environ.get("MLFLOW_REGISTRY_URI")
    target = tracking_target(TrackingSpec(mlflow={"uri": explicit}), storage)
    assert target is not None
    return target.uri


def client_of(uri: str, existing: bool = True) -> Any:
    """An MLflow client of the store at `uri`.

    Raises:
        SpecError: `existing` and `uri` is an embedded (SQLite) store that does not exist.
    """
    from raygen.jobs.tracking import mlflow_client

    if existing and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise SpecError(
            "registry",
            f"there is no model registry at {uri}: give the store with --registry-uri (or "
            "MLFLOW_TRACKING_URI), e.g. sqlite:///path/to/runs/mlflow.db, the embedded store "
            "under the runs' run.storage.",
        )
    return mlflow_client(uri)


@contextmanager
def registry_errors(uri: str, what: str) -> Iterator[None]:
    """MLflow's failures as one clear line: the store unreachable, or what it refused."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        message = f"{what}: the registry at {uri} says: {_first_line(exc)}"
        raise SpecError("registry", message) from None


@dataclass(frozen=True)
class ModelVersion:
    """A registered version, as raygen uses it."""

    uri: str  # the registry's store
    name: str
    version: str
    model: str  # the model directory raygen registered
    sha256: str
    run_id: str | None
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{MODELS_PREFIX}{self.name}/{self.version}"


def register_model(
    model: str,
    name: str,
    uri: str,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> ModelVersion:
    """Register the exported model directory `model` as a new version of `name` (created
    if missing), tagged with its sha256; the run dir's `registry.json` lists it.

    Raises:
        SpecError: `model` is not an exported model directory.
    """
    from mlflow.exceptions import MlflowException

    from raygen.jobs.model_hash import model_sha256

    check_model_dir(model, f"registering {model}")
    client = client_of(uri, existing=False)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    run_dir = model.rstrip("/").rsplit("/", 1)[0]
    tags = {MODEL_TAG: model, SHA256_TAG: model_sha256(model), RUN_DIR_TAG: run_dir, **(tags or {})}
    source = model if is_remote(model) else str(Path(model).resolve())
    if uri.startswith(("http://", "https://")) and not is_remote(model):
        if run_id is None:
            raise SpecError(
                "registry",
                f"{model} is on this machine's disk and {uri} is a tracking server, which "
                "may not point at a client's files: register a model from a tracked run "
                "(its files are then uploaded to the run), or one in object storage.",
            )
        client.log_artifacts(run_id, model, "model")
        source = f"runs:/{run_id}/model"
    version = client.create_model_version(
        name, source, run_id=run_id, tags=tags, await_creation_for=0
    )
    registered = version_of(client, uri, name, version.version)
    _remember(run_dir, registered)
    logger.info("registered %s as %s", model, registered.ref)
    return registered


def register_by_path(path: str, name: str, uri: str | None = None) -> ModelVersion:
    """`raygen models register`: a run directory's model (or a model directory) as a new
    version of `name`, linked to the run's MLflow run when it was tracked in this store."""
    from raygen.jobs.tracking import TRACKING_FILE, read_record

    path = path.rstrip("/")
    is_model = exists(join(path, "config.json")) or exists(join(path, "model_index.json"))
    model = path if is_model else join(path, "model")
    if not is_remote(model):
        model = str(Path(model).resolve())
    uri = uri or registry_uri()
    run_dir = model.rsplit("/", 1)[0]
    record = read_record(join(run_dir, TRACKING_FILE))
    run_id = record.get("run_id") if record.get("uri") == uri else None
    try:
        state = json.loads(read_text(join(run_dir, "run_state.json")) or "{}")
    except json.JSONDecodeError:
        state = {}
    tags = {FINGERPRINT_TAG: state["data_fingerprint"]} if state.get("data_fingerprint") else {}
    with registry_errors(uri, f"registering {model} as {name}"):
        return register_model(model, name, uri, run_id, tags)


def resolve_model(ref: str, uri: str | None = None) -> ModelVersion:
    """The version `models:/NAME/VERSION` or `models:/NAME@ALIAS` names.

    Raises:
        SpecError: the URI is malformed, or names no version, or a model raygen cannot read.
    """
    match = _URI.match(ref)
    if not match:
        raise SpecError(
            "model",
            f"{ref!r} is not a registered model's URI: give models:/NAME/VERSION (e.g. "
            "models:/code-lm/3) or models:/NAME@ALIAS (e.g. models:/code-lm@serving).",
        )
    uri = uri or registry_uri()
    client = client_of(uri)
    from mlflow.exceptions import MlflowException

    name = match["name"]
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"]).version
        else:
            version = match["version"]
        found = version_of(client, uri, name, version)
    except MlflowException as exc:
        missing = getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        if not missing and "not found" not in str(exc).lower():
            raise SpecError(
                "model", f"{ref}: the registry at {uri} cannot be read: {_first_line(exc)}"
            ) from None
        with registry_errors(uri, f"{ref}: no such version"):
            known = [m.name for m in client.search_registered_models(max_results=50)]
        raise SpecError(
            "model",
            f"{ref}: no such version in the registry at {uri} ({_first_line(exc)}); "
            f"registered models there: {', '.join(known) or 'none'}. `raygen models list` "
            "shows them (MLFLOW_TRACKING_URI or --registry-uri choose the store).",
        ) from None
    check_model_dir(found.model, f"{ref} (registered from {found.model})")
    return found


def version_of(client: Any, uri: str, name: str, version: str) -> ModelVersion:
    v = client.get_model_version(name, str(version))
    tags = dict(v.tags or {})
    return ModelVersion(
        uri=uri,
        name=name,
        version=str(v.version),
        model=tags.get(MODEL_TAG) or v.source,
        sha256=tags.get(SHA256_TAG, ""),
        run_id=v.run_id or None,
        tags=tags,
        aliases=tuple(getattr(v, "aliases", None) or ()),
    )


def registrations(model: str) -> list[tuple[str, ModelVersion | None]]:
    """Each version `model` (an exported model directory) was registered as, resolved in
    the store it was registered in: (models:/NAME/VERSION, the version, None when it
    cannot be read now)."""
    out: list[tuple[str, ModelVersion | None]] = []
    for v in registered_versions(model):
        ref = f"{MODELS_PREFIX}{v['name']}/{v['version']}"
        try:
            out.append((ref, resolve_model(ref, v["uri"])))
        except Exception as exc:  # noqa: BLE001 - listed but unreadable: the caller says so
            logger.warning("cannot read %s (registered in %s): %s", ref, v["uri"], exc)
            out.append((ref, None))
    return out


def record_on_versions(
    model: str,
    sha256: str,
    record: Callable[[ModelVersion], None],
    what: str,
    version: ModelVersion | None = None,
) -> list[str]:
    """Record `what` (an audit, a deployment) on `version`, else on every version `model`
    was registered as, each only if it still names these files (`sha256`). The registry
    being unreachable costs the audit or deployment nothing: it is warned about. Returns
    the versions recorded on."""
    versions = [(version.ref, version)] if version is not None else registrations(model)
    recorded = []
    for ref, registered in versions:
        if registered is None:
            continue
        if registered.sha256 != sha256:
            logger.warning(
                "the %s is not recorded on %s: %s holds other files now than the model "
                "registered as it (register it again)", what, ref, model,
            )  # fmt: skip
            continue
        try:
            record(registered)
            recorded.append(ref)
        except Exception as exc:  # noqa: BLE001 - the files of record are written
            logger.warning("could not record the %s on %s: %s", what, ref, exc)
    return recorded


def registered_versions(model: str) -> list[dict[str, str]]:
    """The versions `model` (an exported model directory) was registered as, from its run
    dir's `registry.json`: [{"uri", "name", "version"}]."""
    run_dir = model.rstrip("/").rsplit("/", 1)[0]
    try:
        return json.loads(read_text(join(run_dir, REGISTRY_FILE)) or "[]")
    except json.JSONDecodeError:
        return []


def record_audit(version: ModelVersion, report: dict[str, Any]) -> None:
    """Put an audit's outcome on the version: `audit.passed`, the failing checks, the
    report's URI and the hash of the model it judged."""
    failing = [f"{c['metric']} by {c['feature']}" for c in report["checks"] if not c["passed"]]
    tags = {
        "audit.passed": str(report["passed"]).lower(),
        "audit.failing": ", ".join(failing),
        "audit.report": report["paths"]["audit"],
        "audit.html": report["paths"]["report"],
        "audit.model_sha256": report["model_sha256"],
        "audit.at": report["timestamp"],
        "audit.name": report["name"],
    }
    from raygen.jobs.tracking import log_artifact_to

    client = client_of(version.uri)
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    if version.run_id:
        for path in report["paths"].values():
            try:
                log_artifact_to(client, version.run_id, path, f"audits/{report['name']}")
            except Exception as exc:  # noqa: BLE001 - the version's tags hold the outcome
                logger.warning("could not attach %s to run %s: %s", path, version.run_id, exc)


def record_deployment(version: ModelVersion, entry: dict[str, Any]) -> None:
    """Put a deployment (its audit passed, or overridden on the record) on the version
    (`deployment.<app>`) and, unless it serves as a canary, point the `serving` alias at it.
    """
    client = client_of(version.uri)
    keys = ("url", "at", "user", "audit_passed", "override", "record", "arm")
    record = {k: entry.get(k) for k in keys}
    client.set_model_version_tag(
        version.name, version.version, f"{DEPLOYMENT_PREFIX}{entry['name']}", json.dumps(record)
    )
    if entry.get("arm", "primary") == "primary":
        client.set_registered_model_alias(version.name, SERVING_ALIAS, version.version)


def record_rollout(version: ModelVersion, entry: dict[str, Any]) -> None:
    """Put a canary rollout's decision on the version (`rollout.<app>`: promote or
    rollback, why, by whom, when, which arm it was and the figures); a promoted canary's
    version takes the `serving` alias."""
    client = client_of(version.uri)
    keys = ("action", "reason", "by", "at", "arm", "figures")
    record = {k: entry.get(k) for k in keys}
    client.set_model_version_tag(
        version.name, version.version, f"{ROLLOUT_PREFIX}{entry['name']}", json.dumps(record)
    )
    if entry["action"] == "promote" and entry["arm"] == "canary":
        client.set_registered_model_alias(version.name, SERVING_ALIAS, version.version)


def list_models(uri: str) -> list[dict[str, Any]]:
    """Every registered model with its versions (newest first)."""
    client = client_of(uri)
    with registry_errors(uri, "listing the registered models"):
        return _list_models(client, uri)


def _list_models(client: Any, uri: str) -> list[dict[str, Any]]:
    out = []
    for model in client.search_registered_models(max_results=1000):
        versions = client.search_model_versions(f"name = '{model.name}'", max_results=1000)
        out.append(
            {
                "name": model.name,
                "versions": [
                    summary(version_of(client, uri, model.name, v.version))
                    for v in sorted(versions, key=lambda v: -int(v.version))
                ],
            }
        )
    return out


def summary(version: ModelVersion) -> dict[str, Any]:
    """A version as `raygen models list|show` prints it."""
    tags = version.tags
    audit = None
    if "audit.passed" in tags:
        audit = {
            "passed": tags["audit.passed"] == "true",
            "failing": [f for f in tags.get("audit.failing", "").split(", ") if f],
            "report": tags.get("audit.report"),
            "at": tags.get("audit.at"),
            "of_this_model": tags.get("audit.model_sha256") == version.sha256,
        }
    deployments = {
        key[len(DEPLOYMENT_PREFIX) :]: json.loads(value)
        for key, value in tags.items()
        if key.startswith(DEPLOYMENT_PREFIX)
    }
    return {
        "ref": version.ref,
        "model": version.model,
        "sha256": version.sha256,
        "run_id": version.run_id,
        "data_fingerprint": tags.get(FINGERPRINT_TAG),
        "aliases": list(version.aliases),
        "audit": audit,
        "deployments": deployments,
    }


def _remember(run_dir: str, version: ModelVersion) -> None:
    records = registered_versions(join(run_dir, "model"))
    records.append(
        {"uri": version.uri, "name": version.name, "version": version.version, "at": time.time()}
    )
    write_text(join(run_dir, REGISTRY_FILE), json.dumps(records, indent=2))


def check_model_dir(model: str, what: str) -> None:
    if not (exists(join(model, "config.json")) or exists(join(model, "model_index.json"))):
        raise SpecError(
            "model",
            f"{what}: {model} is not an exported model directory reachable from here (no "
            "config.json or model_index.json); give a run's model/ directory, and register "
            "models in object storage (run.storage: s3://...) to use them from other machines.",
        )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
