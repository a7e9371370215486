"""The audit's HTML report: per check, each group's figure with its interval, the limits
and the verdict."""

from __future__ import annotations

import html
import logging
from typing import Any

logger = logging.getLogger(__name__)


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
        f"{html.escape(report['raygen_version'])}"
        + (
            "<br>prompts sent as the user's turn of a chat"
            if report.get("prompt_format") == "chat"
            else ""
        )
        + "</p>",
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
