"""What the commands print while they work: live bars on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from rich.console import Console

from raygen import render


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120), buffer


ROWS = [
    {"step": 10, "train_loss": 5.0, "lr": 1e-3, "tokens_per_s": 900.0, "step_time_s": 0.2},
    {"step": 20, "train_loss": 4.5, "lr": 1e-3, "tokens_per_s": 950.0, "step_time_s": 0.2},
    {"step": 20, "eval_loss": 4.8, "perplexity": 121.5},
]


def test_training_progress_prints_each_row_in_a_log(monkeypatch):
    log, buffer = console(terminal=False)
    monkeypatch.setattr(render, "out", log)
    with render.TrainingProgress(total_steps=100) as progress:
        assert not progress.live
        for row in ROWS:
            progress(row)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3
    assert "step     10" in lines[0] and "900 tok/s" in lines[0]
    assert "eval_loss 4.8000 ppl 121.5" in lines[2]


def test_training_progress_on_a_terminal_is_a_bar_with_evaluations_above_it(monkeypatch):
    terminal, buffer = console(terminal=True)
    monkeypatch.setattr(render, "out", terminal)
    with render.TrainingProgress(total_steps=100) as progress:
        assert progress.live
        for row in ROWS:
            progress(row)
        task = progress.progress.tasks[0]
        assert (task.completed, task.total) == (20, 100)
        assert task.fields["speed"] == "950 tok/s"
    text = buffer.getvalue()
    assert "eval_loss 4.8000" in text  # evaluations stay on screen
    assert "loss 5.0000" not in text  # training rows only move the bar


def test_sweep_progress_counts_ended_trials_on_a_terminal(monkeypatch):
    terminal, buffer = console(terminal=True)
    monkeypatch.setattr(render, "out", terminal)
    with render.SweepProgress() as progress:
        progress.trials(0, 8)
        progress.line("trial a completed  [0 running, 1 completed]")
        progress.trials(3, 8)
        task = progress.progress.tasks[0]
        assert (task.completed, task.total) == (3, 8)
    assert "trial a completed" in buffer.getvalue()
    log, buffer = console(terminal=False)
    monkeypatch.setattr(render, "out", log)
    with render.SweepProgress() as progress:
        progress.trials(1, 8)  # nothing to draw in a log
        progress.line("trial b stopped early")
    assert buffer.getvalue().splitlines() == ["trial b stopped early"]


def test_stage_progress_in_a_log_prints_a_stage_start_every_interval_and_end(monkeypatch):
    log, buffer = console(terminal=False)
    monkeypatch.setattr(render, "err", log)
    clock = [100.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: clock[0])
    with render.StageProgress(every_s=10) as progress:
        progress("tokenize train documents", 0, 1000)
        clock[0] += 4
        progress("tokenize train documents", 200, 1000)  # within the interval: quiet
        clock[0] += 6
        progress("tokenize train documents", 500, 1000)
        clock[0] += 10
        progress("tokenize train documents", 1000, 1000)
        progress("tokenize train documents", 1000, 1000)  # the end is said once
    lines = [line.split("  ", 1)[1] for line in buffer.getvalue().splitlines()]
    assert lines == [
        "tokenize train documents: 0/1,000 (0%)",
        "tokenize train documents: 500/1,000 (50%)  50.0/s  eta 0:00:10",
        "tokenize train documents: 1,000/1,000 done in 0:00:20 (50.0/s)",
    ]


def test_stage_progress_on_a_terminal_shares_the_training_bar(monkeypatch):
    terminal, _ = console(terminal=True)
    monkeypatch.setattr(render, "out", terminal)
    with render.TrainingProgress(total_steps=100) as progress:
        progress.stages("read and clean documents", 5, 10)
        progress(ROWS[0])
        stage, step = progress.progress.tasks
        assert stage.description == "read and clean documents"
        assert (stage.completed, stage.total) == (5, 10)
        assert (step.description, step.completed, step.total) == ("step", 10, 100)
