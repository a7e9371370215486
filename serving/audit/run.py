"""`raygen audit`: a fairness audit of one exported model, run as a Ray job.

Inference runs in Ray Data actors (`inference`); the figures are computed on the driver
with Fairlearn (`fairness`) and written as `audit.json` and `audit.html` (`report`)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from raygen.cluster.storage import is_remote, join, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.model_hash import MODEL_HASH_FORMAT, model_sha256
from raygen.jobs.progress import Progress, Report
from raygen.serving.audit import fairness
from raygen.serving.audit.checks import audit_spec_problems, checks_by_feature, evidence_of
from raygen.serving.audit.inference import classify_samples, score_texts
from raygen.serving.audit.report import render_html
from raygen.serving.audit.scorers import load_scorer
from raygen.serving.errors import AuditFailed
from raygen.serving.model_hash import model_home
from raygen.serving.runtimes.common import has_chat_template
from raygen.serving.spec import AuditSpec, ClassQualityCheck, OutcomeCheck, QualityCheck

logger = logging.getLogger(__name__)


AUDIT_FILE = "audit.json"


REPORT_FILE = "audit.html"


def default_out_dir(model: str) -> str:
    """`<run>/audit` for a model at `<run>/model`."""
    return join(model_home(model), "audit")


def run_audit(
    spec: AuditSpec,
    source: str,
    model: str,
    out_dir: str | None = None,
    address: str | None = None,
    on_progress: Report | None = None,
) -> dict[str, Any]:
    """Audit `model`, write audit.json and audit.html into `out_dir`, return the report.
    `on_progress` hears the progress of the inference (`jobs.progress`).

    Raises:
        SpecError: the spec does not fit the model or its data.
    """
    from raygen.cluster.connection import connect
    from raygen.jobs.registry import is_registered, resolve_model

    registered = resolve_model(model) if is_registered(model) else None
    if registered is not None:
        model = registered.model
    model = model if is_remote(model) else str(Path(model).resolve())
    problems = audit_spec_problems(spec, model)
    if problems:
        raise SpecError(source, problems)
    out_dir = out_dir or default_out_dir(model)
    started = time.monotonic()
    digest = model_sha256(model)
    connect(address)
    scorers = {
        i: load_scorer(c.scorer) for i, c in enumerate(spec.checks) if isinstance(c, OutcomeCheck)
    }
    with Progress(on_progress) as progress:
        results = _check_results(spec, model, scorers, progress)
    from importlib.metadata import version

    report = {
        "name": spec.name,
        "passed": all(r.passed for r in results),
        "model": model,
        "model_sha256": digest,
        "model_hash_format": MODEL_HASH_FORMAT,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "raygen_version": version("raygen"),
        "duration_s": round(time.monotonic() - started, 1),
        "spec": spec.model_dump(mode="json"),
        # How outcome checks asked the model: a chat model's prompts go through its template.
        "prompt_format": "chat" if has_chat_template(model) else "text",
        "checks": [r.to_json() for r in results],
    }
    write_text(join(out_dir, AUDIT_FILE), json.dumps(report, indent=2, default=_json_number))
    write_text(join(out_dir, REPORT_FILE), render_html(report))
    report["paths"] = {"audit": join(out_dir, AUDIT_FILE), "report": join(out_dir, REPORT_FILE)}
    from raygen.jobs.registry import record_audit, record_on_versions

    report["registered"] = record_on_versions(
        model, digest, lambda v: record_audit(v, report), "audit", registered
    )
    return report


def _check_results(
    spec: AuditSpec, model: str, scorers: dict[int, Any], progress: Progress
) -> list[fairness.CheckResult]:
    """Every check's result: inference across Ray actors, then Fairlearn."""
    results: list[fairness.CheckResult] = []
    evidence = evidence_of(spec)
    if any(not isinstance(c, ClassQualityCheck) for c in spec.checks):
        table = score_texts(spec, model, progress)
        for check, features in checks_by_feature(spec):
            name = fairness.INTERSECTION.join(features)
            if isinstance(check, QualityCheck):
                scored = table[table["loss"].notna()]  # texts of under two tokens have none
                results.append(
                    fairness.quality_of_service(
                        scored["loss"].to_numpy(),
                        fairness.group_labels([scored[f].to_numpy() for f in features]),
                        check.metric,
                        name,
                        evidence,
                        check.max_ratio,
                        check.max_difference,
                    )
                )
            elif isinstance(check, OutcomeCheck):
                index = spec.checks.index(check)
                scorer = scorers[index]
                scores = np.array([scorer(t) for t in table[f"completion_{index}"]], dtype=int)
                labels = table[spec.label_column].to_numpy() if spec.label_column else None
                results.append(
                    fairness.outcome_disparity(
                        scores,
                        fairness.group_labels([table[f].to_numpy() for f in features]),
                        name,
                        evidence,
                        check.min_ratio,
                        check.max_difference,
                        labels,
                        check.max_equalized_odds_difference,
                    )
                )
    for check in spec.checks:
        if isinstance(check, ClassQualityCheck):
            classes, correct = classify_samples(spec, check, model, progress)
            results.append(
                fairness.class_quality(
                    correct, classes, evidence, check.min_ratio, check.max_difference
                )
            )
    return results


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def raise_if_failed(report: dict[str, Any]) -> None:
    if not report["passed"]:
        lines = "\n".join(f"  - {line}" for line in failing_summary(report))
        raise AuditFailed(f"audit {report['name']} of {report['model']} failed:\n{lines}")


def failing_summary(report: dict[str, Any]) -> list[str]:
    """One line per failed check: metric, feature and its reasons."""
    lines = []
    for check in report["checks"]:
        if not check["passed"]:
            lines.append(f"{check['metric']} by {check['feature']}: {'; '.join(check['reasons'])}")
    return lines
