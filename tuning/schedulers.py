"""The sweep's schedulers and search space as Ray Tune objects, and synchronous successive
halving, a Ray Tune scheduler of raygen's own.

Every trial runs to the first rung (`grace_period` evaluations) and pauses there. Once
all of them have, the best 1/`reduction_factor` go on to the next rung (`grace_period` x
`reduction_factor`**k evaluations) and the rest stop; the last survivors run to the end.
Unlike ASHA, no trial goes on before every trial has been compared at its rung, so a trial
that merely arrives first is never promoted for lack of rivals: with few trials and few
at a time, that is what makes ASHA run many more trial-steps. The price: each promoted
trial pauses and restarts from its checkpoint (one Ray Train start-up per rung).

Concurrency: the search generator creates trials `max_running` at a time and counts a
trial as live until Tune tells it the trial completed, so this scheduler reports a trial
that pauses at the first rung as done to it (the generator then creates the next one).
Promoted trials are resumed here, `max_running` at a time.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raygen.jobs.spec import TrainSpec
from raygen.tuning.spec import SweepSpec
from raygen.tuning.validate import evaluations_of, milestones

PAUSING_SCHEDULERS = ("successive_halving", "pbt")


class SuccessiveHalving(FIFOScheduler):
    def __init__(
        self,
        generator: Any,
        trials: int,
        milestones: list[int],
        reduction_factor: float,
        max_running: int,
        metric: str,
        mode: str,
        time_attr: str = "training_iteration",
    ):
        super().__init__()
        self._metric, self.mode = metric, mode
        self.generator = generator  # BasicVariantGenerator: told when a trial pauses
        self.trials = trials  # how many the sweep draws in all
        self.milestones = milestones
        self.reduction_factor = reduction_factor
        self.max_running = max_running
        self.time_attr = time_attr
        self.rung = 0  # index of the milestone trials are running to
        self.scores: dict[Trial, float] = {}  # at the current milestone
        self.out: set[Trial] = set()  # stopped by a cut, finished, or errored
        self.promoted: set[Trial] = set()  # paused, waiting to run to the next milestone
        self.stopped_early = 0

    _supports_buffered_results = False  # one decision per evaluation

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # given to the constructor

    # --- Tune's calls -----------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # restored, already done
            self.out.add(trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self.rung >= len(self.milestones):
            return TrialScheduler.CONTINUE  # the last survivors run to the end
        if result.get(self.time_attr, 0) < self.milestones[self.rung]:
            return TrialScheduler.CONTINUE
        sign = -1.0 if self.mode == "max" else 1.0
        self.scores[trial] = sign * float(result[self._metric])
        if self.rung == 0:
            self.generator.on_trial_complete(trial.trial_id)  # frees its slot: the next starts
        return self._cut(tune_controller, current=trial)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._leave(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._leave(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        running = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        if running >= self.max_running:
            return None
        for trial in trials:
            if trial.status == Trial.PAUSED and trial in self.promoted:
                self.promoted.discard(trial)
                return trial
        return None

    def debug_string(self) -> str:
        milestone = self.milestones[self.rung] if self.rung < len(self.milestones) else "end"
        return (
            f"Successive halving: rung {self.rung} (milestone {milestone}), "
            f"{len(self.scores)} of {self.trials - len(self.out)} there, "
            f"{self.stopped_early} stopped early."
        )

    # --- the rule ---------------------------------------------------------------------------

    def _leave(self, tune_controller: Any, trial: Trial) -> None:
        """A trial is out of the race (finished, errored or removed): the rung may be done."""
        if trial in self.out:
            return
        self.out.add(trial)
        self.scores.pop(trial, None)
        self.promoted.discard(trial)
        if self.rung < len(self.milestones):
            self._cut(tune_controller, current=None)

    def _cut(self, tune_controller: Any, current: Trial | None) -> str:
        """PAUSE until every trial still in has reached the milestone; then keep the best
        1/reduction_factor (returning CONTINUE or STOP for `current`, the reporting one)."""
        if not self.scores or len(self.scores) < self.trials - len(self.out):
            return TrialScheduler.PAUSE
        ranked = sorted(self.scores, key=self.scores.__getitem__)
        keep = math.ceil(len(ranked) / self.reduction_factor)
        self.scores, self.rung = {}, self.rung + 1
        action = TrialScheduler.PAUSE
        for trial in ranked[keep:]:
            self.out.add(trial)
            self.stopped_early += 1
            if trial is current:
                action = TrialScheduler.STOP
            else:
                _stop_paused(tune_controller, trial)
        for trial in ranked[:keep]:
            if trial is current:
                action = TrialScheduler.CONTINUE
            else:
                self.promoted.add(trial)
        return action


def _stop_paused(tune_controller: Any, trial: Trial) -> None:
    """Stop a paused trial, and have Tune save its new status.

    Tune (2.60) marks a stopped trial's state to be saved again only when the trial had a
    running actor; a paused one would stay PAUSED in the saved experiment state, so
    `--resume` would run it again and the sweep would look interrupted.
    """
    tune_controller.stop_trial(trial)
    controller = getattr(tune_controller, "_tune_controller", tune_controller)  # unwrapped
    mark = getattr(controller, "_mark_trial_to_checkpoint", None)
    if mark is not None:
        mark(trial)


def param_space(sweep: SweepSpec, grids_as_choices: bool = False) -> dict[str, Any]:
    """Tune domains of the searched keys (PBT mutates over grids as choices)."""
    from ray import tune

    make = {
        "choice": tune.choice,
        "uniform": lambda b: tune.uniform(*b),
        "loguniform": lambda b: tune.loguniform(*b),
        "randint": lambda b: tune.randint(*b),
        "grid": tune.choice if grids_as_choices else tune.grid_search,
    }
    return {key: make[d.kind](getattr(d, d.kind)) for key, d in sweep.search.items()}


def build_scheduler(sweep: SweepSpec, base: TrainSpec, generator: Any, at_once: int) -> Any:
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )

    s = sweep.scheduler
    if s.type == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=s.max_t or evaluations_of(base),
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.type == "successive_halving":
        return SuccessiveHalving(
            generator,
            trials=sweep.trials(),
            milestones=milestones(s, base),
            reduction_factor=s.reduction_factor,
            max_running=at_once,
            metric=sweep.metric,
            mode=sweep.mode,
        )
    if s.type == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=s.grace_period, min_samples_required=2
        )
    if s.type == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=param_space(sweep, grids_as_choices=True),
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            synch=s.synch,
        )
    return FIFOScheduler()


def trials_that_fit(spec: TrainSpec, resources: dict[str, float]) -> int:
    """Trials the cluster's CPUs and GPUs can run at once (at least 1)."""
    per_worker = spec.scaling.per_worker()
    fits = [
        int(resources.get(name, 0) // (amount * spec.scaling.num_workers))
        for name, amount in per_worker.items()
        if amount > 0
    ]
    return max(1, min(fits) if fits else 1)
