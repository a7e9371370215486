"""Everything the commands print: one console for results (stdout), one for errors and
progress notes (stderr). Terminals get colour and live progress bars; pipes and CI logs
get plain lines."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console

out = Console()
err = Console(stderr=True)


def plain(line: str) -> None:
    out.print(line, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)


def metrics_row(row: dict[str, Any]) -> str:
    """One line for a row of metrics.jsonl (a training step, an evaluation, or both)."""
    from raygen.jobs.train import metrics as m

    parts = [f"step {row[m.STEP]:>6}"]
    if m.TRAIN_LOSS in row:
        parts.append(f"loss {row[m.TRAIN_LOSS]:.4f}")
        parts.append(f"lr {row[m.LR]:.2e}")
        if m.TOKENS_PER_S in row:
            parts.append(f"{row[m.TOKENS_PER_S]:,.0f} tok/s")
        else:
            parts.append(f"{row[m.SAMPLES_PER_S]:,.1f} samples/s")
        parts.append(f"{row[m.STEP_TIME_S]:.3f} s/step")
    evaluation = []
    if m.EVAL_LOSS in row:
        evaluation.append(f"eval_loss {row[m.EVAL_LOSS]:.4f}")
    if m.PERPLEXITY in row:
        evaluation.append(f"ppl {row[m.PERPLEXITY]:.1f}")
    if m.PSNR in row:
        evaluation.append(f"psnr {row[m.PSNR]:.2f} dB (mean image {row[m.MEAN_IMAGE_PSNR]:.2f})")
    if m.FID in row:
        evaluation.append(f"fid({row[m.FID_EXTRACTOR]}) {row[m.FID]:.2f}")
    if m.IS_MEAN in row:
        evaluation.append(f"is {row[m.IS_MEAN]:.2f}")
    if evaluation:
        parts.append(f"[cyan]{' '.join(evaluation)}[/]")
    return "  ".join(parts)


def _live_bar() -> Any:
    """A started rich progress display on the results console, for tasks added with a
    description and a `speed` field: what, done of all, the bar, speed, time elapsed and time
    left. It disappears when stopped."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=out,
        transient=True,
    )
    progress.start()
    return progress


class TrainingProgress:
    """Follows a run: its data preparation (`stages`, see StageProgress), then its metrics
    rows. On a terminal: a live bar (step/total, throughput, ETA) with evaluations printed
    above it. Elsewhere (a pipe, a CI log): each row as a plain line, as the run logs them
    (every `train.log_every` steps)."""

    def __init__(self, total_steps: int, live: bool | None = None):
        self.total = total_steps
        self.live = out.is_terminal if live is None else live
        self.progress = None
        self.task = None
        self.stages = StageProgress(live=self.live)

    def __enter__(self) -> TrainingProgress:
        if self.live:
            self.progress = self.stages.progress = _live_bar()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, row: dict[str, Any]) -> None:
        from raygen.jobs.train import metrics as m

        if self.progress is None:
            out.print(metrics_row(row), highlight=False, soft_wrap=True)
            return
        if self.task is None:
            self.task = self.progress.add_task("step", total=self.total, speed="")
        speed = ""
        if m.TOKENS_PER_S in row:
            speed = f"{row[m.TOKENS_PER_S]:,.0f} tok/s"
        elif m.SAMPLES_PER_S in row:
            speed = f"{row[m.SAMPLES_PER_S]:,.1f} samples/s"
        fields = {"speed": speed} if speed else {}
        self.progress.update(self.task, completed=row[m.STEP], **fields)
        if m.EVAL_LOSS in row:  # evaluations stay on screen above the bar
            self.progress.console.print(metrics_row(row), highlight=False, soft_wrap=True)


class SweepProgress:
    """Follows a sweep: its data preparation (`stages`, see StageProgress), its progress
    lines (trials starting, evaluations, trials ending) and, on a terminal, a live bar of
    the trials ended out of all, with the time left."""

    def __init__(self, live: bool | None = None):
        self.live = out.is_terminal if live is None else live
        self.progress = None
        self.task = None
        self.stages = StageProgress(live=self.live)

    def __enter__(self) -> SweepProgress:
        if self.live:
            self.progress = self.stages.progress = _live_bar()
            self.task = self.progress.add_task("trials", total=None, speed="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def line(self, text: str) -> None:
        console = self.progress.console if self.progress is not None else out
        console.print(text, highlight=False, soft_wrap=True)

    def trials(self, ended: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=ended, total=total)


class StageProgress:
    """Follows stages of work spread over Ray (`jobs.progress`: data preparation, audit
    inference). On a terminal: a live bar per stage (rows done of all, rows/s, elapsed, ETA).
    Elsewhere (a pipe, a CI log): a plain line when a stage starts, every `every_s` seconds
    while it runs, and when it ends. Training and sweeps hold one in `stages`, drawn in their
    own live display."""

    def __init__(self, live: bool | None = None, every_s: float = 10.0):
        self.live = out.is_terminal if live is None else live
        self.every_s = every_s
        self.progress = None
        self.tasks: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}
        self.ended: set[str] = set()
        self.lock = threading.Lock()  # reports come from a watcher thread per stage

    def __enter__(self) -> StageProgress:
        if self.live:
            self.progress = _live_bar()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        with self.lock:
            now = time.monotonic()
            started = self.started.setdefault(stage, now)
            rate = done / (now - started) if done and now > started else 0.0
            speed = f"{rate:,.1f}/s" if rate else ""
            if self.progress is not None:
                if stage not in self.tasks:
                    self.tasks[stage] = self.progress.add_task(stage, total=total, speed="")
                self.progress.update(self.tasks[stage], completed=done, total=total, speed=speed)
                return
            last = self.printed.get(stage)
            if last == float("inf") or (
                last is not None and done < total and now - last < self.every_s
            ):
                return
            line = f"{stage}: {done:,}/{total:,}"
            if done >= total:
                line += f" done in {_clock(now - started)}" + (f" ({speed})" if speed else "")
                self.printed[stage] = float("inf")
            else:
                line += f" ({done / total:.0%})" if total else ""
                if rate:
                    line += f"  {speed}  eta {_clock((total - done) / rate)}"
                self.printed[stage] = now
            stamped(line, to_err=True)


def training_summary(result: dict[str, Any]) -> None:
    metrics = result.get("final_metrics", {})
    paths = result["paths"]
    if result.get("up_to_date"):
        out.print(
            f"[green]{result['name']} is already trained to step {result['final_step']}[/] "
            "(raise train.max_steps with --set to continue, or --fresh to start over)."
        )
    else:
        attempts = result.get("attempts", [])
        restarts = max(0, len([a for a in attempts if a["previous_error"]]))
        out.print(
            f"[green]done[/]: {result['name']} reached step {result['final_step']} in "
            f"{result['wall_time_s']:.0f} s"
            + (f" after {restarts} recovered failure(s)" if restarts else "")
        )
    startup = result.get("startup")
    if startup:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in startup.items() if k != "total")
        out.print(f"  first log   {startup['total']:.0f} s after launch ({phases})", soft_wrap=True)
    for key in ("train_loss", "eval_loss", "perplexity", "fid"):
        if key in metrics:
            out.print(f"  {key:<11} {metrics[key]:.4f}")
    if paths.get("samples"):
        out.print(f"  samples     {paths['samples']}")
    out.print(f"  model       {paths['model']}")
    out.print(
        f"  run         {paths['run_dir']}  (metrics.jsonl, tensorboard/, result.json)",
        soft_wrap=True,
    )
    tracking_summary(result.get("tracking"))


def tracking_summary(tracking: dict[str, Any] | None) -> None:
    """Where a run (or sweep) is tracked, and what the tracking store did not take."""
    if not tracking:
        return
    run = tracking["run_id"] or "not created yet"
    out.print(f"  mlflow      run {run} in experiment {tracking['experiment']!r}", soft_wrap=True)
    out.print(f"              see it: {tracking['browse']}", soft_wrap=True, highlight=False)
    if tracking.get("registered"):
        out.print(f"  registered  {tracking['registered']}", soft_wrap=True)
    unsent = tracking.get("unsent")
    if unsent:
        records = ", ".join(unsent["records"]) or "no other record"
        err.print(
            f"[yellow]MLflow did not take {unsent['metric_rows']} metric row(s) and {records}[/] "
            f"({tracking.get('error')}); the metric rows are sent again when the run is next "
            "launched.",
            soft_wrap=True,
        )
    for refused in tracking.get("refused") or []:
        err.print(f"[yellow]MLflow refused {refused}[/]", soft_wrap=True)


def trials(summary: dict[str, Any], metric: str) -> None:
    from rich.table import Table

    rows = summary["trials"]
    table = Table(title=f"{len(rows)} trials")
    searched = [k for k in rows[0] if k.startswith("config.")] if rows else []
    for column in ["trial_id", "status", "iterations", f"best_{metric}", *searched]:
        table.add_column(column.removeprefix("config."))
    for row in rows:
        cells = [row["trial_id"], row["status"], str(row["iterations"])]
        for key in [f"best_{metric}", *searched]:
            value = row[key]
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row(*cells)
    out.print(table)
    best = summary["best"]
    out.print(
        f"[green]best[/]: trial {best['trial_id']} {metric} {best['value']:.4f} "
        f"({', '.join(f'{k}={v}' for k, v in best['config'].items())})"
    )
    for name, path in summary["paths"].items():
        out.print(f"  {name:<7} {path}", soft_wrap=True)
    tracking_summary(summary.get("tracking"))


def _interval(check: dict[str, Any], figure: str) -> str:
    """` [low, high]`: a figure's confidence interval, when the audit has one."""
    span = (check.get("intervals") or {}).get(figure)
    return f" [{span[0]:.3g}, {span[1]:.3g}]" if span else ""


def audit_report(report: dict[str, Any]) -> None:
    for check in report["checks"]:
        mark = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]"
        groups = ", ".join(
            f"{g} {v:.4g} (n={check['counts'].get(g, 0)})" for g, v in check["by_group"].items()
        )
        out.print(
            f"{mark} {check['metric']} by {check['feature']}: {groups}; ratio "
            f"{check['ratio']:.3f}{_interval(check, 'ratio')}, difference "
            f"{check['difference']:.4g}{_interval(check, 'difference')}",
            highlight=False,
            soft_wrap=True,
        )
        for reason in check["reasons"]:
            out.print(f"     {reason}", highlight=False, soft_wrap=True)
    verdict = "[green]passed[/]" if report["passed"] else "[red]failed[/]"
    out.print(f"audit {report['name']} {verdict} in {report['duration_s']:.0f} s")
    out.print(f"  report  {report['paths']['report']}", soft_wrap=True)
    out.print(f"  audit   {report['paths']['audit']}", soft_wrap=True)


def deployment(info: dict[str, Any], spec: Any) -> None:
    url = info["url"]
    replaced = info.get("replaced")
    done = "updated" if replaced is not None else "deployed"
    out.print(
        f"[green]{done}[/] {info['name']} ({info['kind']}) in {info['deploy_s']:.0f} s at {url}",
        soft_wrap=True,
    )
    canary = info.get("canary")
    if canary:
        out.print(
            f"  canary: {canary['model']} (sha256 {canary['model_sha256'][:16]}) answers "
            f"{canary['traffic_percent']:g}% of requests",
            highlight=False,
            soft_wrap=True,
        )
    if replaced:
        was = (replaced.get("model_sha256") or "?")[:16]
        out.print(
            f"  in place: model sha256 {was} -> {info['model_sha256'][:16]}; the old replicas "
            "finished the requests they had",
            highlight=False,
        )
    endpoint = "/v1/completions" if info["kind"] == "language-model" else "/v1/images/generations"
    out.print(f"  {endpoint:<24} POST   API docs: {url}/docs", highlight=False)
    scaling = spec.autoscaling
    out.print(
        f"  replicas {scaling.min_replicas}..{scaling.max_replicas}"
        + (
            " (scales to zero: the first request waits for a cold start)"
            if not scaling.min_replicas
            else ""
        ),
        highlight=False,
    )


def applications(rows: list[dict[str, Any]]) -> None:
    if not rows:
        out.print("no applications are running")
    for row in rows:
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in row["replicas"].items())
        out.print(
            f"{row['name']}  {row['status']}  replicas: {replicas or '0'}  "
            f"deployed {row['deployed']}" + (f"  ({row['message']})" if row["message"] else ""),
            highlight=False,
            soft_wrap=True,
        )
        serving = row.get("serving")
        if serving and (len(serving["arms"]) > 1 or serving.get("decision")):
            for arm, figures in serving["arms"].items():
                share = serving["canary_percent"]
                share = share if arm == "canary" else 100 - share
                out.print(f"  {arm:<8} {share:g}%  {_arm_figures(figures)}", highlight=False)
        decision = (serving or {}).get("decision")
        if decision:
            out.print(
                f"  decided: {decision['action']} by {decision['by']} at {decision['at']}: "
                f"{decision['reason']}",
                highlight=False,
                soft_wrap=True,
            )


def _arm_figures(f: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    return (
        f"sha256 {f['model_sha256'][:12]}  requests {f['requests']}  errors {f['errors']}  "
        f"filtered {f['filtered']}  p50 {ms(f['p50_ms'])}  p99 {ms(f['p99_ms'])}"
    )


def rollout_decision(name: str, decision: dict[str, Any]) -> None:
    done = "promoted" if decision["action"] == "promote" else "rolled back"
    out.print(f"{name}: canary {done} ({decision['reason']})", highlight=False, soft_wrap=True)
    for arm, figures in decision["figures"].items():
        out.print(
            f"  {arm:<8} requests {figures['requests']}  errors {figures['errors']}  "
            f"filtered {figures['filtered']}  p99 {figures['p99_ms']} ms",
            highlight=False,
        )
    out.print("recorded in both models' deployment records", highlight=False)


def submitted(job: dict[str, Any], working_dir: Any) -> None:
    out.print(f"submitted {job['job_id']}: {job['entrypoint']}", highlight=False, soft_wrap=True)
    out.print(
        f"  uploaded {job['upload_bytes'] / 2**20:.1f} MiB from {working_dir}; "
        f"environment forwarded: {', '.join(job['env']) or 'none'}",
        highlight=False,
        soft_wrap=True,
    )


def stamped(line: str, to_err: bool = False) -> None:
    """A line with the time of day (long-running watches)."""
    console = err if to_err else out
    console.print(f"{time.strftime('%H:%M:%S')}  {line}", highlight=False, markup=False)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def registered_models(models: list[dict[str, Any]], uri: str) -> None:
    """Registered models' versions with their audit and deployment state."""
    from rich.table import Table

    table = Table(title=f"registered models in {uri}")
    for column in ("version", "aliases", "audit", "deployed", "sha256", "model"):
        table.add_column(column, overflow="fold")  # wrapped, never cut: each is looked up
    for model in models:
        for v in model["versions"]:
            audit = v["audit"]
            if audit is None:
                verdict = "[yellow]none[/]"
            elif not audit["of_this_model"]:
                verdict = "[yellow]of another model[/]"
            elif audit["passed"]:
                verdict = "[green]passed[/]"
            else:
                verdict = f"[red]failed[/]: {', '.join(audit['failing'])}"
            deployed = ", ".join(
                f"{app}{' (overridden)' if d.get('override') else ''}"
                for app, d in v["deployments"].items()
            )
            table.add_row(
                v["ref"], ", ".join(v["aliases"]), verdict, deployed or "-", v["sha256"][:12],
                v["model"],
            )  # fmt: skip
    out.print(table)


def lineage(chain: dict[str, Any]) -> None:
    """A model's lineage, link by link; what no longer matches is flagged in red."""
    links = chain["links"]
    files = links["inputs"]["files"]
    changed = [f for f in files if not f["unchanged"]]
    size = sum(f["size"] for f in files)
    state = f"[red]{len(changed)} changed since[/]" if changed else "unchanged"
    _link("inputs", f"{len(files)} file(s), {size} bytes, {state}")
    data = links["prepared_data"]
    _link("data", f"{data['path']} (fingerprint {data['fingerprint']})")
    vae = data.get("latent_vae")
    if vae:
        state = "unchanged" if vae["unchanged"] else "[red]gone or changed since[/]"
        digest = vae["sha256"][:16]
        _link("", f"latents encoded by the VAE {vae['path']} (sha256 {digest}, {state})")
    run = links["run"]
    if "status" in run:
        _link(
            "run",
            f"{run['path']}: {run['status']} at step {run['final_step']}, "
            f"{run['attempts']} attempt(s), {run['failures']} failure(s), "
            f"{run['preemptions']} preemption(s)",
        )
        if run.get("mlflow"):
            _link("", f"MLflow run {run['mlflow']['run_id']} in {run['mlflow']['uri']}")
    _link("checkpoint", str(links["checkpoint"]["path"]))
    _link("model", f"{chain['model']} sha256 {chain['sha256'][:16]}")
    for version in links["registered"]:
        _link("registered", version["ref"])
    for audit in links["audits"]:
        verdict = "[green]passed[/]" if audit["passed"] else "[red]failed[/]"
        if audit["failing"]:
            verdict += f" ({', '.join(audit['failing'])})"
        other = "" if audit["of_this_model"] else " [red]of other model files[/]"
        _link("audit", f"{audit['name']} {verdict} at {audit['at']}{other}: {audit['path']}")
    for d in links["deployments"]:
        how = "audit passed" if d["audit_passed"] else "audit overridden"
        if d["event"] != "deployed":
            how = f"override by {d['user']}: {d['reason']}"
        _link("deployed", f"{d['name']} at {d['at']} ({how}) {d['url'] or ''}")
    for problem in chain["problems"]:
        err.print(f"[red]! {problem}[/]", soft_wrap=True)


def _link(name: str, text: str) -> None:
    out.print(f"[bold]{name:<11}[/] {text}", soft_wrap=True)
