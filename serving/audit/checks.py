"""An audit spec checked against the model and the evaluation sets before anything runs:
every problem at once, each naming its key and the fix."""

from __future__ import annotations

import logging
from typing import Any

from raygen.cluster.storage import FAILURES, exists, join
from raygen.jobs.errors import SpecError
from raygen.serving.audit.scorers import load_scorer
from raygen.serving.spec import AuditSpec, ClassQualityCheck, OutcomeCheck, QualityCheck

logger = logging.getLogger(__name__)


def checks_by_feature(spec: AuditSpec) -> list[tuple[Any, tuple[str, ...]]]:
    """(check, features) pairs: a check runs once per sensitive feature it names, and once
    more on their intersection when it names several (each combination of groups a cell)."""
    pairs: list[tuple[Any, tuple[str, ...]]] = []
    for check in spec.checks:
        if isinstance(check, ClassQualityCheck):
            pairs.append((check, ("class",)))
            continue
        features = check.features or spec.sensitive_features
        pairs += [(check, (f,)) for f in features]
        if len(features) > 1:
            pairs.append((check, tuple(features)))
    return pairs


def evidence_of(spec: AuditSpec) -> Any:
    """The spec's rules of evidence, for `serving.audit.fairness`."""
    from raygen.serving.audit.fairness import Evidence

    return Evidence(
        min_group_size=spec.min_group_size,
        n_boot=spec.n_boot,
        confidence=spec.confidence,
        seed=spec.bootstrap_seed,
        decision=spec.decision,
    )


def audit_spec_problems(spec: AuditSpec, model: str) -> list[str]:
    """Everything wrong with running `spec` on `model`, each naming its key and the fix."""
    from raygen.serving.runtimes.common import IMAGE_KINDS, LANGUAGE_MODEL, detect_kind

    try:
        kind = detect_kind(model)
    except SpecError as exc:
        return [f"--model: {p}" for p in exc.problems]
    problems = []
    text_checks = [c for c in spec.checks if not isinstance(c, ClassQualityCheck)]
    for i, check in enumerate(spec.checks):
        images = isinstance(check, ClassQualityCheck)
        if (kind in IMAGE_KINDS) != images:
            wanted = "class-conditional image (diffusion or GAN)" if images else LANGUAGE_MODEL
            problems.append(
                f"`checks.{i}`: {check.metric} audits a {wanted} model, but {model} is a "
                f"{kind} model."
            )
    if text_checks:
        if not spec.sensitive_features:
            problems.append("`sensitive_features`: name the columns whose groups to compare.")
        if spec.data is None:
            problems.append("`data`: the evaluation Parquet is required for text checks.")
        else:
            columns = _columns(spec.data, problems)
            needed = {f"sensitive_features.{i}": c for i, c in enumerate(spec.sensitive_features)}
            if any(isinstance(c, QualityCheck) for c in text_checks):
                needed["text_column"] = spec.text_column
            if spec.label_column:
                needed["label_column"] = spec.label_column
            for i, check in enumerate(spec.checks):
                if isinstance(check, OutcomeCheck):
                    needed[f"checks.{i}.prompt_column"] = check.prompt_column
            if columns is not None:
                for key, column in needed.items():
                    if column not in columns:
                        problems.append(
                            f"`{key}`: {spec.data} has no column {column!r} (columns: "
                            f"{', '.join(columns)})."
                        )
    for i, check in enumerate(spec.checks):
        for feature in getattr(check, "features", None) or []:
            if feature not in spec.sensitive_features:
                problems.append(
                    f"`checks.{i}.features`: {feature!r} is not in sensitive_features "
                    f"{spec.sensitive_features}."
                )
        if isinstance(check, OutcomeCheck):
            try:
                load_scorer(check.scorer)
            except SpecError as exc:
                problems += [f"`checks.{i}.scorer`: {p}" for p in exc.problems]
            if check.max_equalized_odds_difference is not None and not spec.label_column:
                problems.append(f"`checks.{i}.max_equalized_odds_difference` needs `label_column`.")
        if isinstance(check, ClassQualityCheck):
            from raygen.jobs.eval.fid import CLASSIFIER_FILE, FID_DIR

            classifier_dir = fid_dir(check.classifier)
            if not exists(join(classifier_dir, CLASSIFIER_FILE)):
                problems.append(
                    f"`checks.{i}.classifier`: {check.classifier} has no {FID_DIR}/"
                    f"{CLASSIFIER_FILE}; give the prepared data dir of the model's training "
                    "run (raygen trains that classifier on labelled images during preparation)."
                )
    return problems


def fid_dir(path: str) -> str:
    from raygen.jobs.eval.fid import CLASSIFIER_FILE, FID_DIR

    return path if exists(join(path, CLASSIFIER_FILE)) else join(path, FID_DIR)


def _columns(uri: str, problems: list[str]) -> list[str] | None:
    import pyarrow.dataset as pads

    from raygen.cluster.storage import resolve

    try:
        fs, path = resolve(uri)
        return list(pads.dataset(path, filesystem=fs, format="parquet").schema.names)
    except (*FAILURES, ValueError) as exc:
        problems.append(f"`data`: cannot read {uri} as Parquet: {exc}.")
        return None
