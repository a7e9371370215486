"""Lineage: the chain that produced a model, from its input files to its deployments, each
link checked against what is there today.

    input files -> prepared data -> training run -> checkpoint -> model -> audits -> deployments

Each link says what it records and whether that still holds: an input file whose content
changed since the data was prepared, prepared data that is not what the run trained on, a
model whose files changed since it was exported, registered or audited. Such a link is
flagged (`problems`), never left out.
"""

from __future__ import annotations

import json
from typing import Any

from raygen.cluster.errors import StorageError
from raygen.cluster.storage import content_id, exists, is_remote, join, read_text
from raygen.jobs.model_hash import MODEL_HASH_FORMAT, model_sha256
from raygen.jobs.run_dir import (
    INTERRUPTIONS_FILE,
    PREEMPTED,
    RUN_STATE_FILE,
    SPEC_FILE,
    read_attempts,
    read_jsonl,
    read_result,
)
from raygen.serving.audit.run import AUDIT_FILE, default_out_dir
from raygen.serving.gate import DEPLOYED, OVERRIDE, list_records
from raygen.serving.model_hash import model_home


def lineage(model: str) -> dict[str, Any]:
    """The chain behind `model` (an exported model directory, a URI, or models:/...).

    Raises:
        SpecError: `model` is not a model raygen can read (or no such registered version).
    """
    from pathlib import Path

    from raygen.jobs.registry import (
        check_model_dir,
        is_registered,
        registrations,
        resolve_model,
        summary,
    )

    if is_registered(model):
        version = resolve_model(model)
        model, versions = version.model, [version]
    else:
        model = model if is_remote(model) else str(Path(model).resolve())
        check_model_dir(model, "raygen lineage")
        versions = [version for _, version in registrations(model)]
    digest = model_sha256(model)
    run_dir = model_home(model)
    problems: list[str] = []
    result = read_result(run_dir) or {}
    state = _json(join(run_dir, RUN_STATE_FILE))
    prepared = _prepared(state, problems)
    links = {
        "inputs": _inputs(prepared, problems),
        "prepared_data": prepared,
        "run": _run(run_dir, result, problems),
        "checkpoint": {"path": (result.get("paths") or {}).get("checkpoint")},
        "model": {"path": model, "sha256": digest},
        "registered": [],
        "audits": [],
        "deployments": [],
    }
    tracked = (result.get("tracking") or {}).get("run_id")
    if tracked:
        links["run"]["mlflow"] = {"uri": result["tracking"]["uri"], "run_id": tracked}
    for version in versions:
        if version is None:
            problems.append(f"a registered version listed in {run_dir} cannot be read")
            continue
        entry = summary(version)
        links["registered"].append(entry)
        if version.sha256 != digest:
            problems.append(
                f"{version.ref} was registered with model sha256 {version.sha256[:16]}, but "
                f"{model} is {digest[:16]} now: its files changed since it was registered"
            )
    links["audits"] = _audits(model, digest, [v for v in versions if v], problems)
    links["deployments"] = _deployments(model, digest, problems)
    return {"model": model, "sha256": digest, "links": links, "problems": problems}


def _json(uri: str) -> dict[str, Any]:
    try:
        return json.loads(read_text(uri) or "{}")
    except (json.JSONDecodeError, StorageError):
        return {}


def _prepared(state: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The prepared data the run trained on, and whether its directory still holds it."""
    trained_on = state.get("data_fingerprint")
    directory = state.get("prepared")
    if not directory:
        problems.append("the run records no prepared data (run_state.json is missing)")
        return {"path": None, "fingerprint": None}
    stats = _json(join(directory, "data_stats.json"))
    link = {
        "path": directory,
        "fingerprint": trained_on,
        "stats": {k: v for k, v in stats.items() if k.startswith(("rows_", "removed_", "train_"))},
        "inputs": stats.get("inputs"),
    }
    vae = stats.get("latent_vae")
    if vae:  # latent diffusion: the VAE that encoded the latents, itself a traced model
        link["latent_vae"] = {**vae, "unchanged": _sha256_now(vae["path"]) == vae["sha256"]}
        if not link["latent_vae"]["unchanged"]:
            problems.append(
                f"the VAE {vae['path']} that encoded the latents is gone or changed since "
                f"(sha256 {vae['sha256'][:16]} then); `raygen lineage {vae['path']}` traces it"
            )
    if not stats:
        problems.append(f"the prepared data {directory} is gone (the run trained on {trained_on})")
    elif stats.get("fingerprint") != trained_on:
        problems.append(
            f"the prepared data in {directory} is {stats.get('fingerprint')} now, not the "
            f"{trained_on} the run trained on: it was prepared again from other inputs"
        )
    return link


def _sha256_now(model_dir: str) -> str | None:
    try:
        return model_sha256(model_dir) if exists(model_dir) else None
    except (StorageError, OSError):
        return None


def _inputs(prepared: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Each input file with its size and content id then, and whether it still has it."""
    recorded = prepared.pop("inputs", None)
    if recorded is None:
        if prepared.get("path"):
            problems.append("the input files were not recorded (prepared by an older raygen)")
        return {"files": []}
    files = []
    for split, entries in recorded.items():
        for entry in entries:
            now = _content_now(entry)
            ok = now == entry["content_id"]
            files.append({**entry, "split": split, "content_id_now": now, "unchanged": ok})
            if not ok:
                what = "is gone" if now is None else "has other contents"
                problems.append(
                    f"input {entry['path']} {what} since the data was prepared "
                    f"({entry['content_id']} then)"
                )
    return {"files": files}


def _content_now(entry: dict[str, Any]) -> str | None:
    if entry["content_id"] == "builtin":
        return "builtin"
    try:
        return content_id(entry["path"])
    except StorageError:
        return None


def _run(run_dir: str, result: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The training run: its spec, how it ended, its attempts, failures and preemptions."""
    if not exists(join(run_dir, SPEC_FILE)):
        problems.append(f"{run_dir} holds no training run (the model was copied out of one?)")
        return {"path": run_dir}
    interruptions = read_jsonl(join(run_dir, INTERRUPTIONS_FILE))
    preempted = [i for i in interruptions if i.get("kind") == PREEMPTED]
    return {
        "path": run_dir,
        "spec": join(run_dir, SPEC_FILE),
        "status": result.get("status"),
        "final_step": result.get("final_step"),
        "attempts": len(read_attempts(run_dir)),
        "failures": len(interruptions) - len(preempted),
        "preemptions": len(preempted),
    }


def _audits(
    model: str, digest: str, versions: list[Any], problems: list[str]
) -> list[dict[str, Any]]:
    """The audits of the model: the one beside it, and those recorded on its versions."""
    paths = [join(default_out_dir(model), AUDIT_FILE)]
    paths += [v.tags["audit.report"] for v in versions if v.tags.get("audit.report")]
    audits = []
    for path in dict.fromkeys(paths):
        report = _json(path)
        if not report:
            continue
        of_this_model = report.get("model_sha256") == digest
        audits.append(
            {
                "path": path,
                "name": report.get("name"),
                "passed": report.get("passed"),
                "at": report.get("timestamp"),
                "failing": [
                    f"{c['metric']} by {c['feature']}"
                    for c in report.get("checks", [])
                    if not c["passed"]
                ],
                "model_sha256": report.get("model_sha256"),
                "of_this_model": of_this_model,
            }
        )
        if report.get("model_hash_format") != MODEL_HASH_FORMAT:
            problems.append(
                f"the audit {path} hashed the model another way (an older raygen): its "
                "sha256 cannot be compared with today's; audit the model again"
            )
        elif not of_this_model:
            problems.append(
                f"the model's files changed since its audit {path} ({report.get('timestamp')}):"
                f" it judged sha256 {str(report.get('model_sha256'))[:16]}, the model is "
                f"{digest[:16]} now"
            )
    return audits


def _deployments(model: str, digest: str, problems: list[str]) -> list[dict[str, Any]]:
    out = []
    for record in list_records(model):
        if record.get("event") not in (DEPLOYED, OVERRIDE):
            continue
        entry = {
            "event": record["event"],
            "at": record.get("at"),
            "name": record.get("name"),
            "url": record.get("url"),
            "audit_passed": record.get("audit_passed"),
            "user": record.get("user"),
            "reason": record.get("reason"),
            "model_sha256": record.get("model_sha256"),
        }
        out.append(entry)
        if record.get("model_sha256") and record["model_sha256"] != digest:
            problems.append(
                f"deployment {record.get('name')} at {record.get('at')} served model sha256 "
                f"{record['model_sha256'][:16]}, not the model's files today ({digest[:16]})"
            )
    return out
