"""`raygen audit`: a fairness audit of one exported model, run as a Ray job.

Inference (each row's loss, each prompt's completion, each generated image's class) runs
in Ray Data actors across the cluster; the figures are computed on the driver with
Fairlearn (`serving/fairness.py`) and written as `audit.json` and `audit.html`.
"""

from __future__ import annotations

import html
import importlib
import json
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raygen.cluster.storage import exists, is_remote, join, local_copy, read_text, write_text
from raygen.jobs.errors import SpecError
from raygen.jobs.seeding import derive_seed
from raygen.serving.errors import AuditFailed
from raygen.serving.gate import MODEL_HASH_FORMAT, failing_summary, model_home, model_sha256
from raygen.serving.spec import AuditSpec, ClassQualityCheck, OutcomeCheck, QualityCheck

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
REPORT_FILE = "audit.html"


def default_out_dir(model: str) -> str:
    """`<run>/audit` for a model at `<run>/model`."""
    return join(model_home(model), "audit")


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
    """The spec's rules of evidence, for `serving.fairness`."""
    from raygen.serving.fairness import Evidence

    return Evidence(
        min_group_size=spec.min_group_size,
        n_boot=spec.n_boot,
        confidence=spec.confidence,
        seed=spec.bootstrap_seed,
        decision=spec.decision,
    )


def audit_problems(spec: AuditSpec, model: str) -> list[str]:
    """Everything wrong with running `spec` on `model`, each naming its key and the fix."""
    from raygen.serving.models import DIFFUSION, LANGUAGE_MODEL, detect_kind

    try:
        kind = detect_kind(model)
    except SpecError as exc:
        return [f"--model: {p}" for p in exc.problems]
    problems = []
    text_checks = [c for c in spec.checks if not isinstance(c, ClassQualityCheck)]
    for i, check in enumerate(spec.checks):
        wanted = DIFFUSION if isinstance(check, ClassQualityCheck) else LANGUAGE_MODEL
        if kind != wanted:
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

            fid_dir = _fid_dir(check.classifier)
            if not exists(join(fid_dir, CLASSIFIER_FILE)):
                problems.append(
                    f"`checks.{i}.classifier`: {check.classifier} has no {FID_DIR}/"
                    f"{CLASSIFIER_FILE}; give the prepared data dir of the model's training "
                    "run (raygen trains that classifier on labelled images during preparation)."
                )
    return problems


def _fid_dir(path: str) -> str:
    from raygen.jobs.eval.fid import CLASSIFIER_FILE, FID_DIR

    return path if exists(join(path, CLASSIFIER_FILE)) else join(path, FID_DIR)


def _read_table(uri: str, columns: list[str]) -> Any:
    import pyarrow.dataset as pads

    from raygen.cluster.storage import resolve, storage_error

    fs, path = resolve(uri)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    except OSError as exc:
        raise storage_error(uri, exc) from None


def _columns(uri: str, problems: list[str]) -> list[str] | None:
    import pyarrow.dataset as pads

    from raygen.cluster.storage import resolve

    try:
        fs, path = resolve(uri)
        return list(pads.dataset(path, filesystem=fs, format="parquet").schema.names)
    except (OSError, ValueError) as exc:
        problems.append(f"`data`: cannot read {uri} as Parquet: {exc}.")
        return None


def load_scorer(scorer: str) -> Callable[[str], int]:
    """A completion -> 0/1 function from `lexicon:PATH` or `module:function`.

    Raises:
        SpecError: the file or function cannot be found.
    """
    kind, sep, target = scorer.partition(":")
    if not sep or not target:
        raise SpecError("scorer", f"{scorer!r}: use lexicon:PATH or module:function.")
    if kind == "lexicon":
        text = read_text(target) if is_remote(target) else _read_local(target)
        if text is None:
            raise SpecError("scorer", f"lexicon file {target} does not exist.")
        words = {w.strip().lower() for w in text.splitlines() if w.strip() and w[0] != "#"}
        if not words:
            raise SpecError("scorer", f"lexicon file {target} holds no words.")
        return LexiconScorer(words)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(kind), target)
    except (ImportError, AttributeError) as exc:
        raise SpecError("scorer", f"cannot import {scorer}: {exc}.") from None
    if not callable(function):
        raise SpecError("scorer", f"{scorer} is not a function.")
    return function


def _read_local(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


class LexiconScorer:
    """1 when a completion contains any word of the lexicon (whole words, any case)."""

    def __init__(self, words: set[str]):
        import re

        self.pattern = re.compile(
            r"\b(?:" + "|".join(re.escape(w) for w in sorted(words)) + r")\b", re.I
        )

    def __call__(self, text: str) -> int:
        return int(bool(self.pattern.search(text)))


def run_audit(
    spec: AuditSpec,
    source: str,
    model: str,
    out_dir: str | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Audit `model`, write audit.json and audit.html into `out_dir`, return the report.

    Raises:
        SpecError: the spec does not fit the model or its data.
    """
    from raygen.cluster.connection import connect
    from raygen.serving import fairness

    model = model if is_remote(model) else str(Path(model).resolve())
    problems = audit_problems(spec, model)
    if problems:
        raise SpecError(source, problems)
    out_dir = out_dir or default_out_dir(model)
    started = time.monotonic()
    digest = model_sha256(model)
    connect(address)
    results: list[fairness.CheckResult] = []
    text_checks = [c for c in spec.checks if not isinstance(c, ClassQualityCheck)]
    scorers = {
        i: load_scorer(c.scorer) for i, c in enumerate(spec.checks) if isinstance(c, OutcomeCheck)
    }
    evidence = evidence_of(spec)
    if text_checks:
        table = _score_texts(spec, model)
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
            classes, correct = _classify_samples(spec, check, model)
            results.append(
                fairness.class_quality(
                    correct, classes, evidence, check.min_ratio, check.max_difference
                )
            )
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
        "checks": [r.to_json() for r in results],
    }
    write_text(join(out_dir, AUDIT_FILE), json.dumps(report, indent=2, default=_json_number))
    write_text(join(out_dir, REPORT_FILE), render_html(report))
    report["paths"] = {"audit": join(out_dir, AUDIT_FILE), "report": join(out_dir, REPORT_FILE)}
    return report


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def raise_if_failed(report: dict[str, Any]) -> None:
    if not report["passed"]:
        lines = "\n".join(f"  - {line}" for line in failing_summary(report))
        raise AuditFailed(f"audit {report['name']} of {report['model']} failed:\n{lines}")


# --- inference on Ray ---------------------------------------------------------------------


def _score_texts(spec: AuditSpec, model: str) -> Any:
    """The evaluation rows with `loss` (mean token loss) and `completion_<i>` columns."""
    import ray.data

    from raygen.cluster.connection import capacity_problems
    from raygen.cluster.errors import ClusterError

    shortfall = capacity_problems({"CPU": 1}, spec.workers, embedded=True)
    workers = spec.workers if not shortfall else 1
    columns = sorted(
        {spec.text_column, *spec.sensitive_features}
        | ({spec.label_column} if spec.label_column else set())
        | {c.prompt_column for c in spec.checks if isinstance(c, OutcomeCheck)}
    )
    # Evaluation sets are small next to the work on them: read here, and let the actors
    # hold every CPU (tasks queued behind CPU-holding actors would wait forever on a small
    # cluster).
    table = _read_table(spec.data, columns)
    if spec.max_rows:
        table = table.slice(0, spec.max_rows)
    # Blocks of one batch each, so every actor gets work (no repartition task needed).
    step = spec.batch_size
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, max(len(table), 1), step)])
    tasks = {
        "loss": any(isinstance(c, QualityCheck) for c in spec.checks),
        "text_column": spec.text_column,
        "max_text_tokens": spec.max_text_tokens,
        "completions": [
            (i, c.prompt_column, c.max_new_tokens, c.temperature, c.seed)
            for i, c in enumerate(spec.checks)
            if isinstance(c, OutcomeCheck)
        ],
    }
    try:
        scored = ds.map_batches(
            _TextScorer,
            fn_constructor_kwargs={"model_dir": model, "tasks": tasks},
            batch_size=spec.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        return scored.to_pandas()
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"the audit's inference failed: {exc}") from None


class _TextScorer:
    """A Ray Data actor: the model, scoring batches of evaluation rows."""

    def __init__(self, model_dir: str, tasks: dict[str, Any]):
        import torch

        from raygen.serving.models import LanguageModel

        torch.set_num_threads(1)
        self.model = LanguageModel(local_copy(model_dir))
        self.tasks = tasks

    def __call__(self, batch: Any) -> Any:
        from raygen.serving.models import TextRequest

        tasks = self.tasks
        if tasks["loss"]:
            batch["loss"] = self.model.mean_token_losses(
                list(batch[tasks["text_column"]]), tasks["max_text_tokens"]
            )
        context = self.model.context_length
        for index, column, max_new, temperature, seed in tasks["completions"]:
            requests = []
            for prompt in batch[column]:
                ids = self.model.encode(str(prompt))[-(context - max_new) :]
                # Seeded by the prompt itself: the same whatever batch or actor it lands in.
                row_seed = derive_seed(seed, zlib.crc32(str(prompt).encode()))
                requests.append(TextRequest(ids, max_new, temperature, 1.0, [], row_seed))
            texts = [""] * len(requests)
            for deltas in self.model.generate(requests):
                for i, delta in enumerate(deltas):
                    if delta is not None:
                        texts[i] += delta.text
            batch[f"completion_{index}"] = texts
        return batch


def _classify_samples(
    spec: AuditSpec, check: ClassQualityCheck, model: str
) -> tuple[np.ndarray, np.ndarray]:
    """Generate `samples_per_class` images of every class across Ray actors and classify
    them with the run's classifier: (asked class, 1 where the classifier agreed)."""
    import ray.data

    from raygen.serving.models import DiffusionModel

    classes = DiffusionModel(local_copy(model)).num_classes
    if not classes:
        raise SpecError("--model", f"{model} is unconditional; class_accuracy needs classes.")
    items = [
        {"label": k, "index": i} for k in range(classes) for i in range(check.samples_per_class)
    ]
    table = (
        ray.data.from_items(items)
        .map_batches(
            _ImageClassifier,
            fn_constructor_kwargs={
                "model_dir": model,
                "fid_dir": _fid_dir(check.classifier),
                "steps": check.num_inference_steps,
                "seed": check.seed,
            },
            batch_size=spec.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=spec.workers),
            num_cpus=1,
        )
        .to_pandas()
    )
    return table["label"].to_numpy(), table["correct"].to_numpy()


class _ImageClassifier:
    def __init__(self, model_dir: str, fid_dir: str, steps: int, seed: int):
        import torch

        from raygen.jobs.eval.fid import load_extractor
        from raygen.serving.models import DiffusionModel

        torch.set_num_threads(1)
        self.model = DiffusionModel(local_copy(model_dir))
        self.classifier = load_extractor("classifier", local_copy(fid_dir), None).network
        self.steps, self.seed = steps, seed

    def __call__(self, batch: Any) -> Any:
        import torch

        from raygen.serving.models import ImageRequest

        images = []
        for label, index in zip(batch["label"], batch["index"], strict=True):
            # Image `index` of class `label`: its own seed, whatever batch it lands in.
            request = ImageRequest(1, self.steps, derive_seed(self.seed, label, index), int(label))
            images.append(self.model.generate([request])[0][0])
        pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            predicted = self.classifier(pixels).argmax(-1).numpy()
        batch["correct"] = (predicted == batch["label"].to_numpy()).astype(int)
        return batch


# --- the report ---------------------------------------------------------------------------


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML report: verdict, one bar chart (PNG) and table per check."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    color = "#1a7f37" if report["passed"] else "#cf222e"
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>Audit {html.escape(report['name'])}: {verdict}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td,th{padding:.2em .8em;text-align:left}</style>",
        f"<h1>Audit {html.escape(report['name'])}: "
        f"<span style='color:{color}'>{verdict}</span></h1>",
        f"<p>Model <code>{html.escape(report['model'])}</code><br>sha256 "
        f"<code>{report['model_sha256']}</code><br>{report['timestamp']}, raygen "
        f"{html.escape(report['raygen_version'])}</p>",
    ]
    for check in report["checks"]:
        status = "passed" if check["passed"] else "failed"
        parts.append(
            f"<h2>{html.escape(check['metric'])} by {html.escape(check['feature'])}: {status}</h2>"
        )
        parts.append(f"<img alt='chart' src='data:image/png;base64,{_chart(check)}'>")
        intervals = check.get("intervals") or {}
        level = f"{intervals['confidence']:.0%} interval" if intervals else "interval"
        rows = "".join(
            f"<tr><td>{html.escape(g)}</td><td>{v:.4g}</td>"
            f"<td>{_span(intervals.get('by_group', {}).get(g))}</td>"
            f"<td>{check['counts'].get(g, 0)}</td></tr>"
            for g, v in check["by_group"].items()
        )
        parts.append(
            f"<table><tr><th>group</th><th>value</th><th>{level}</th><th>rows</th></tr>"
            f"{rows}</table>"
        )
        figures = {
            name: f"{check[name]:.4g}" + (f" {_span(intervals[name])}" if name in intervals else "")
            for name in ("overall", "ratio", "difference")
        }
        figures.update({k: f"{v:.4g}" for k, v in check.get("extra", {}).items()})
        evidence = (
            f"; {intervals['n_boot']} bootstrap resamples, decision {check.get('decision')}"
            if intervals
            else ""
        )
        parts.append(
            "<p>"
            + ", ".join(f"{k} {v}" for k, v in figures.items())
            + "; thresholds "
            + (", ".join(f"{k} {v}" for k, v in check["thresholds"].items()) or "none")
            + evidence
            + "</p>"
        )
        if check["reasons"]:
            items = "".join(f"<li>{html.escape(r)}</li>" for r in check["reasons"])
            parts.append(f"<ul>{items}</ul>")
    return "\n".join(parts)


def _span(interval: list[float] | None) -> str:
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""


def _chart(check: dict[str, Any]) -> str:
    """A bar per group with its confidence interval as an error bar, and the threshold
    each group must meet as a dashed line."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(check["by_group"])
    values = [check["by_group"][g] for g in groups]
    fig, ax = plt.subplots(figsize=(6, 3))
    limit = _group_limit(check)
    colors = []
    for value in values:
        beyond = limit is not None and (value > limit[0] if limit[2] else value < limit[0])
        colors.append("#cf222e" if beyond else "#0969da")
    spans = (check.get("intervals") or {}).get("by_group")
    errors = None
    if spans:  # distances below and above each value
        errors = [
            [max(0.0, v - spans[g][0]) for g, v in zip(groups, values, strict=True)],
            [max(0.0, spans[g][1] - v) for g, v in zip(groups, values, strict=True)],
        ]
    ax.bar(groups, values, color=colors, yerr=errors, capsize=4)
    if len(groups) > 4:
        ax.tick_params(axis="x", labelrotation=30)
    if limit is not None:
        ax.axhline(limit[0], linestyle="--", color="black", label=limit[1])
        ax.legend(loc="lower right")
    ax.set_ylabel(check["metric"])
    ax.set_title(f"{check['metric']} by {check['feature']}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _group_limit(check: dict[str, Any]) -> tuple[float, str, bool] | None:
    """(the value a group may reach given the best group and the ratio threshold, its
    label, whether it is an upper limit)."""
    values = list(check["by_group"].values())
    thresholds = check["thresholds"]
    if "max_ratio" in thresholds:
        limit = thresholds["max_ratio"]
        return min(values) * limit, f"best x max_ratio {limit}", True
    if "min_ratio" in thresholds:
        limit = thresholds["min_ratio"]
        return max(values) * limit, f"best x min_ratio {limit}", False
    return None
