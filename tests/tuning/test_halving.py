"""Synchronous successive halving's rule, driven by hand (no Ray): who pauses, who is compared,
who stops, who is resumed and how many at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.tune.schedulers import TrialScheduler

from raygen.tuning.schedulers import SuccessiveHalving
from raygen.tuning.spec import SweepSpec, rungs

CONTINUE, PAUSE, STOP = TrialScheduler.CONTINUE, TrialScheduler.PAUSE, TrialScheduler.STOP


@dataclass(eq=False)
class FakeTrial:
    trial_id: str
    status: str = "RUNNING"


@dataclass
class FakeController:
    trials: list[FakeTrial]
    stopped: list[str] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)  # to be saved again (Tune's state file)

    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def stop_trial(self, trial: FakeTrial) -> None:
        trial.status = "TERMINATED"
        self.stopped.append(trial.trial_id)

    def _mark_trial_to_checkpoint(self, trial: FakeTrial) -> None:
        self.marked.append(trial.trial_id)


class FakeGenerator:
    def __init__(self):
        self.completed: list[str] = []

    def on_trial_complete(self, trial_id: str) -> None:
        self.completed.append(trial_id)


def scheduler(n: int, milestones: list[int], factor: float = 3, at_once: int = 2, mode="min"):
    generator = FakeGenerator()
    sha = SuccessiveHalving(
        generator, n, milestones, factor, max_running=at_once, metric="loss", mode=mode
    )
    return sha, generator


def report(sha, controller, trial, iteration, loss):
    action = sha.on_trial_result(controller, trial, {"training_iteration": iteration, "loss": loss})
    trial.status = {PAUSE: "PAUSED", STOP: "TERMINATED", CONTINUE: "RUNNING"}[action]
    return action


def test_rungs_grow_by_the_factor_below_max_t():
    assert rungs(2, 3, 12) == [2, 6]
    assert rungs(1, 2, 8) == [1, 2, 4]
    assert rungs(1, 3, 1) == []


def test_trials_wait_at_the_rung_then_only_the_best_third_goes_on():
    trials = [FakeTrial(f"t{i}") for i in range(5)]
    controller = FakeController(trials)
    sha, generator = scheduler(5, [2, 6])
    losses = [5.0, 3.0, 4.0, 6.0, 2.0]
    for trial, loss in zip(trials[:4], losses, strict=False):
        assert report(sha, controller, trial, 1, loss) == CONTINUE  # below the rung
        assert report(sha, controller, trial, 2, loss) == PAUSE  # waits for the others
    assert generator.completed == ["t0", "t1", "t2", "t3"]  # each pause frees a slot
    assert controller.stopped == []
    # The last one arrives with the best loss: it goes on at once; t1 (second best) too,
    # after a resume; the other three stop.
    assert report(sha, controller, trials[4], 2, losses[4]) == CONTINUE
    assert sorted(controller.stopped) == ["t0", "t2", "t3"]
    assert controller.marked == controller.stopped  # their new status reaches the state file
    assert sha.choose_trial_to_run(controller) is trials[1]
    trials[1].status = "PENDING"
    assert sha.choose_trial_to_run(controller) is trials[1]  # pending first, nothing else
    assert sha.stopped_early == 3


def test_the_reporting_trial_stops_when_it_loses_and_max_mode_ranks_the_other_way():
    trials = [FakeTrial("a"), FakeTrial("b")]
    controller = FakeController(trials)
    sha, _ = scheduler(2, [1], factor=2, mode="max")
    assert report(sha, controller, trials[0], 1, 0.9) == PAUSE
    assert report(sha, controller, trials[1], 1, 0.1) == STOP  # lower is worse in max mode
    assert sha.choose_trial_to_run(controller) is trials[0]
    # Past the last rung the survivor runs to the end.
    trials[0].status = "RUNNING"
    assert report(sha, controller, trials[0], 5, 0.95) == CONTINUE


def test_promoted_trials_resume_no_more_than_max_running_at_once():
    trials = [FakeTrial(f"t{i}") for i in range(6)]
    controller = FakeController(trials)
    sha, _ = scheduler(6, [1, 2], factor=1.5, at_once=2)  # keep 4 of 6
    for i, trial in enumerate(trials):
        report(sha, controller, trial, 1, float(i))
    assert [t.status for t in trials] == ["PAUSED"] * 4 + ["TERMINATED"] * 2
    first = sha.choose_trial_to_run(controller)
    first.status = "RUNNING"
    second = sha.choose_trial_to_run(controller)
    second.status = "RUNNING"
    assert sha.choose_trial_to_run(controller) is None  # two run already
    first.status = "PAUSED"  # it reached the next rung
    assert sha.choose_trial_to_run(controller) not in (None, first, second)


def test_a_trial_that_errors_before_the_rung_does_not_hold_the_others():
    trials = [FakeTrial("a"), FakeTrial("b"), FakeTrial("c")]
    controller = FakeController(trials)
    sha, _ = scheduler(3, [1], factor=2)
    report(sha, controller, trials[0], 1, 1.0)
    report(sha, controller, trials[1], 1, 2.0)
    assert controller.stopped == []
    trials[2].status = "ERROR"
    sha.on_trial_error(controller, trials[2])  # the rung now holds everyone left
    assert controller.stopped == ["b"]
    assert sha.choose_trial_to_run(controller) is trials[0]


def test_trial_count_multiplies_samples_by_grid_combinations():
    spec = SweepSpec.model_validate(
        {
            "name": "s",
            "base": "b.yaml",
            "num_samples": 3,
            "search": {
                "train.lr": {"grid": [1e-3, 1e-2]},
                "model.config.n_embd": {"grid": [64, 128, 256]},
                "train.warmup_steps": {"randint": [0, 10]},
            },
        }
    )
    assert spec.trials() == 18
