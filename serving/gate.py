"""The deployment gate, both sides: the driver's decision before anything is deployed, and
the replica's check before it serves.

A model is served only if a passed audit of this exact model exists (its `model_sha256`
equals the model's), or a person overrode the audit on the record: an override record in
the model's deployment records (`<run>/deployments/`, one file per record, so concurrent
writers never lose each other's records) naming this model's hash. A config carries only
the record's name; replicas read the record itself.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from raygen.cluster.storage import join, list_files, read_text, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.model_hash import MODEL_HASH_FORMAT, model_sha256
from raygen.serving.audit.run import failing_summary, run_audit
from raygen.serving.errors import AuditFailed
from raygen.serving.model_hash import model_home
from raygen.serving.spec import PRIMARY, AuditOverride, DeploySpec, arm_specs, with_arm

logger = logging.getLogger(__name__)

RECORDS_DIR = "deployments"
OVERRIDE = "audit_override"
DEPLOYED = "deployed"


def read_audit(uri: str) -> dict[str, Any] | None:
    """A `raygen audit` report, or None when the file does not exist.

    Raises:
        SpecError: the file is not an audit.json.
    """
    text = read_text(uri)
    if text is None:
        return None
    try:
        report = json.loads(text)
    except ValueError as exc:
        raise SpecError(
            "audit", f"{uri} is not JSON ({exc}); give the audit.json of `raygen audit`."
        ) from None
    if not isinstance(report, dict) or not {"passed", "model_sha256", "checks"} <= set(report):
        raise SpecError("audit", f"{uri} is not an audit.json written by `raygen audit`.")
    return report


def audit_problems(report: dict[str, Any] | None, audit: str, model: str, digest: str) -> list[str]:
    """Why `report` (read from `audit`) does not clear `model` (hash `digest`); [] if it does."""
    if report is None:
        return [f"{audit} does not exist: run `raygen audit` on the model first"]
    rerun = f"raygen audit AUDIT_SPEC --model {model}"
    if report.get("model_hash_format") != MODEL_HASH_FORMAT:
        return [
            f"{audit} was written by an older raygen, whose model hash cannot be compared "
            f"with this one's: re-run the audit: {rerun}"
        ]
    if report["model_sha256"] != digest:
        return [
            f"{audit} is an audit of model sha256 {report['model_sha256'][:16]}, but {model} is "
            f"{digest[:16]}: the model changed since (or it is another model); audit it: {rerun}"
        ]
    if report["passed"] is True:
        return []
    return failing_summary(report) or [f"{audit} records a failed audit"]


# --- deployment records ---------------------------------------------------------------------


def write_record(model: str, event: str, entry: dict[str, Any]) -> str:
    """Add a record to the model's deployment records; returns its name. One file per
    record: writers never read-modify-write, so none is lost to another."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{stamp}-{event}-{uuid.uuid4().hex[:12]}.json"
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"event": event, "at": at, **entry}
    write_text(join(model_home(model), RECORDS_DIR, name), json.dumps(record, indent=2))
    return name


def read_record(model: str, name: str) -> dict[str, Any] | None:
    """One deployment record of the model, or None if there is none of that name."""
    if "/" in name or name.startswith("."):
        return None
    text = read_text(join(model_home(model), RECORDS_DIR, name))
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def list_records(model: str) -> list[dict[str, Any]]:
    """The model's deployment records, oldest first, each with its `record` name."""
    from raygen.cluster.errors import StorageError

    try:
        files = list_files(join(model_home(model), RECORDS_DIR), ".json")
    except StorageError:  # no records yet
        return []
    records = []
    for entry in files:
        name = entry.uri.rsplit("/", 1)[-1]
        record = read_record(model, name)
        if record is not None:
            records.append({**record, "record": name})
    return sorted(records, key=lambda r: r["record"])


def record_deployment(spec: DeploySpec, info: dict[str, Any]) -> str:
    """Record a deployment that started, on each model it serves (and their registered
    versions); returns the path of the primary model's record."""
    paths = {}
    for arm, armed in arm_specs(spec).items():
        arm_info = info if arm == PRIMARY else {**info, **info["canary"], "replaced": None}
        paths[arm] = _record_arm(armed, arm_info, arm, spec)
    return paths[PRIMARY]


def _record_arm(armed: DeploySpec, info: dict[str, Any], arm: str, spec: DeploySpec) -> str:
    """Record the deployment of one arm's model, beside the model and on its versions."""
    override = armed.audit_override
    entry = {
        "name": spec.name,
        "model": armed.model,
        "model_sha256": info.get("model_sha256"),
        "url": info.get("url"),
        "audit": armed.audit,
        "audit_passed": override is None,
        "override": override.record if override else None,
        "replaced": info.get("replaced"),
        "arm": arm,
        "spec": spec.model_dump(mode="json", exclude={"audit_override"}),
    }
    name = write_record(armed.model, DEPLOYED, entry)
    path = join(model_home(armed.model), RECORDS_DIR, name)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    from raygen.jobs.registry import record_deployment as record_on
    from raygen.jobs.registry import record_on_versions, resolve_model

    # On the registered version deployed, else on every version the directory was
    # registered as; a primary's moves its `serving` alias.
    registered = armed.registered_version
    try:
        version = resolve_model(registered) if registered else None
    except Exception as exc:  # noqa: BLE001 - the deployment stands; its record is written
        logger.warning("could not record the deployment on %s: %s", registered, exc)
        return path
    recorded = {**entry, "record": path, "at": at, "user": user_name()}
    record_on_versions(
        armed.model, entry["model_sha256"], lambda v: record_on(v, recorded), "deployment", version
    )
    return path


def user_name() -> str:
    """Who is acting: RAYGEN_USER, else the login name."""
    return os.environ.get("RAYGEN_USER") or getpass.getuser()


# --- the driver's side ----------------------------------------------------------------------


def clear(
    spec: DeploySpec,
    report: dict[str, Any] | None,
    digest: str,
    override_reason: str | None,
    arm: str = PRIMARY,
) -> DeploySpec:
    """The decision: `spec` as it may be deployed, or AuditFailed.

    With `override_reason` and a failing audit, writes the override record and returns the
    spec pointing at it.

    Raises:
        AuditFailed: the audit does not clear the model and no override was given.
    """
    assert spec.audit is not None
    failing = audit_problems(report, spec.audit, spec.model, digest)
    if not failing:
        return spec.model_copy(update={"audit_override": None})
    if not override_reason:
        lines = "\n".join(f"  - {line}" for line in failing)
        which = f"deployment of {spec.name}" if arm == PRIMARY else f"the canary of {spec.name}"
        raise AuditFailed(
            f"{which} refused by its audit:\n{lines}\nNothing was deployed. "
            'Fix the model (or the audit), or deploy anyway with --override-audit "REASON" '
            "(recorded with your name)."
        )
    user = user_name()
    record = write_record(
        spec.model,
        OVERRIDE,
        {
            "name": spec.name,
            "model": spec.model,
            "model_sha256": digest,
            "audit": spec.audit,
            "reason": override_reason,
            "user": user,
            "failing": failing,
            "arm": arm,
        },
    )
    logger.warning("audit overridden by %s: %s (record %s)", user, override_reason, record)
    return spec.model_copy(update={"audit_override": AuditOverride(record=record)})


def gate_arms(
    spec: DeploySpec,
    override_reason: str | None = None,
    address: str | None = None,
    on_event: Callable[[str], None] = logger.info,
) -> DeploySpec:
    """The gate for each model the application serves: the primary, then the canary (no
    traffic reaches a canary its gate refused). An override applies to whichever model's
    audit failed, and its record says which arm that was.

    Raises:
        AuditFailed, SpecError: as `gate`, for either model.
    """
    gated = spec
    for arm, armed in arm_specs(spec).items():
        say = on_event if arm == PRIMARY else (lambda line: on_event(f"canary {line}"))
        gated = with_arm(gated, arm, gate(armed, override_reason, address, say, arm))
    return gated


def gate(
    spec: DeploySpec,
    override_reason: str | None = None,
    address: str | None = None,
    on_event: Callable[[str], None] = logger.info,
    arm: str = PRIMARY,
) -> DeploySpec:
    """The deployment gate: a passed audit of this exact model, or an override on record.

    Runs the audit first when `spec.audit` is an audit spec. Returns the spec with `audit`
    pointing at the audit.json (and `audit_override` at the override's record when
    overridden), which replicas check again when they start (`serving/gate.py`).

    Raises:
        AuditFailed: the audit failed or is of another model, and no override was given.
        SpecError: the audit spec or audit.json cannot be read.
    """
    from raygen.jobs.loader import load_spec
    from raygen.jobs.model_hash import model_sha256
    from raygen.serving.spec import AuditSpec

    assert spec.audit is not None  # resolve_deploy_spec requires it
    if spec.audit.endswith(".json"):
        audit_json = spec.audit
        report = read_audit(audit_json)
        if report is not None:
            on_event(f"audit: {audit_json} ({'passed' if report['passed'] else 'failed'})")
    else:
        on_event(f"audit: running {spec.audit} on {spec.model}")
        audit_spec = load_spec(AuditSpec, spec.audit)
        report = run_audit(audit_spec, spec.audit, spec.model, address=address)
        audit_json = report["paths"]["audit"]
        on_event(
            f"audit: {'passed' if report['passed'] else 'failed'}; report "
            f"{report['paths']['report']}"
        )
    resolved = spec.model_copy(update={"audit": audit_json})
    return clear(resolved, report, model_sha256(spec.model), override_reason, arm)


# --- the replica's side ---------------------------------------------------------------------


def serving_clearance(spec: DeploySpec) -> dict[str, Any]:
    """Check, where the model is served, that a passed audit of this exact model exists or
    that its override is on the record; returns what `/v1/models` shows (no paths).

    Raises:
        AuditFailed: neither holds (the replica then refuses to start).
    """
    digest = model_sha256(spec.model)
    try:
        report = read_audit(spec.audit) if spec.audit else None
    except SpecError as exc:
        report, unreadable = None, str(exc)
    else:
        unreadable = None
    problems = (
        [unreadable]
        if unreadable
        else audit_problems(report, spec.audit or "(no audit)", spec.model, digest)
    )
    if not problems and report is not None:
        return {
            "passed": True,
            "name": report.get("name"),
            "model_sha256": digest,
            "timestamp": report.get("timestamp"),
        }
    if spec.audit_override is None:
        raise AuditFailed(
            f"{spec.name} may not serve {spec.model}: {'; '.join(problems)}. Deploy with "
            "`raygen serve` (which runs the gate), or `raygen serve build` after a passed "
            "`raygen audit` of this model."
        )
    name = spec.audit_override.record
    record = read_record(spec.model, name)
    if record is None or record.get("event") != OVERRIDE:
        where = join(model_home(spec.model), RECORDS_DIR)
        raise AuditFailed(
            f"`audit_override` names the record {name}, but {where} holds no override record "
            f"of that name: an override is made with `raygen serve --override-audit REASON` "
            "(or `serve build --override-audit`), which records it; it cannot be written into "
            f"a config by hand. The audit: {'; '.join(problems)}."
        )
    if record.get("model_sha256") != digest:
        raise AuditFailed(
            f"the override record {name} is for model sha256 "
            f"{str(record.get('model_sha256'))[:16]}, but {spec.model} is {digest[:16]}: the "
            "config was pointed at another model than the one overridden; audit this model, "
            "or override its audit on the record."
        )
    return {
        "passed": False,
        "overridden": True,
        "model_sha256": digest,
        "reason": record.get("reason"),
        "user": record.get("user"),
        "at": record.get("at"),
    }
