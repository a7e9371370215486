"""Every resource of a trial that is not running is released, and a sweep whose trials
cannot get resources says what they asked for (and stops past `run.pending_timeout_s`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.stopper import Stopper

logger = logging.getLogger(__name__)


class Resources(Callback, Stopper):
    """Tune callback and stopper: every resource of a trial that is not running (stopped,
    errored, paused) is released, and a sweep whose trials cannot get resources says so.

    Ray Train removes a run's placement group when the run ends, also when it is killed (a
    cleaner actor watches it), but only once its worker group has started: a run killed
    while its group was pending or starting leaves the group behind, and once the group is
    placed it holds resources no actor uses, which the next trial waits for forever. So a
    placement group created during the sweep that is placed but has no live actor in it
    for RELEASE_GRACE_S is removed here (a live trial or worker group has its actors in its
    group within seconds). Placement groups pending for long are reported with what they
    ask for and what the cluster has, and past `pending_timeout_s` the sweep stops.
    """

    RELEASE_GRACE_S = 20.0
    PENDING_WARN_S = 60.0
    CHECK_EVERY_S = 2.0

    def __init__(self, pending_timeout_s: float):
        self.pending_timeout_s = pending_timeout_s
        self.stalled: str | None = None  # why the sweep must stop (Tune stops its trials)
        try:  # groups that exist before the sweep are not the sweep's
            self.before = {g.placement_group_id for g in _placement_groups()}
        except Exception as exc:  # a check that cannot run must not stop the sweep
            logger.warning("cannot list the cluster's placement groups: %s", exc)
            self.before = set()
        self.unused_since: dict[str, float] = {}
        self.removed: list[str] = []
        self.pending_since: dict[str, float] = {}
        self.warned: set[str] = set()
        self.checked = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "unused_since": {}, "pending_since": {}}

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.stalled is not None

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.checked < self.CHECK_EVERY_S:
            return
        self.checked = now
        try:
            groups = _placement_groups()
            self._release_unused(groups, now)
            self._watch_pending(groups, now)
        except Exception as exc:  # a check that cannot run must not stop the sweep
            logger.debug("resource check skipped: %s", exc)

    def _release_unused(self, groups: list, now: float) -> None:
        from ray.util.state import list_actors

        placed = [
            g for g in groups if g.state == "CREATED" and g.placement_group_id not in self.before
        ]
        if not placed:
            self.unused_since.clear()
            return
        alive = list_actors(
            address=_state_address(),
            filters=[("state", "=", "ALIVE")],
            detail=True,
            limit=10_000,
        )
        used = {a.placement_group_id for a in alive if a.placement_group_id}
        unused = {g.placement_group_id: g for g in placed if g.placement_group_id not in used}
        self.unused_since = {k: v for k, v in self.unused_since.items() if k in unused}
        for group_id, group in unused.items():
            if now - self.unused_since.setdefault(group_id, now) < self.RELEASE_GRACE_S:
                continue
            asks = [b.get("unit_resources") for b in group.bundles or []]
            logger.warning(
                "placement group %s holds %s and no actor runs in it (its trial's run was "
                "stopped while it started); removing it",
                group_id,
                asks,
            )
            _remove_group(group_id)
            self.removed.append(group_id)

    def _watch_pending(self, groups: list, now: float) -> None:
        pending = [g for g in groups if g.state == "PENDING"]
        ids = {p.placement_group_id for p in pending}
        self.pending_since = {k: v for k, v in self.pending_since.items() if k in ids}
        for group in pending:
            waited = now - self.pending_since.setdefault(group.placement_group_id, now)
            if waited < self.PENDING_WARN_S and waited < self.pending_timeout_s:
                continue
            asks = [b.get("unit_resources") for b in group.bundles or []]
            available = _plain_resources(ray.available_resources())
            message = (
                f"a trial's workers have waited {waited:.0f} s for resources {asks}; the "
                f"cluster has {available} free of {_cluster_resources()}"
            )
            if waited >= self.pending_timeout_s:
                self.stalled = (
                    f"{message}. Stopped after run.pending_timeout_s "
                    f"({self.pending_timeout_s:g} s): lower max_concurrent_trials or the "
                    "workers' resources, or add nodes."
                )
            if group.placement_group_id not in self.warned:
                self.warned.add(group.placement_group_id)
                logger.warning("%s; still waiting", message)

    def release_all(self, timeout_s: float = 30.0, settle_s: float = 8.0) -> None:
        """Once Tune is done: wait for the trials' Train runs to end, then remove every
        placement group the sweep created that is still there (nothing will use it). A run
        killed while it asked for a group can have the request land a moment after it died:
        the sweep's groups are looked for again until none has come for `settle_s`."""
        from ray.util.state import list_actors

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = list_actors(
                address=_state_address(),
                filters=[("state", "=", "ALIVE"), ("class_name", "=", "TrainController")],
            )
            if not alive:
                break
            time.sleep(0.5)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle_s and time.monotonic() < deadline + settle_s:
            left = [
                g.placement_group_id
                for g in _placement_groups()
                if g.state != "REMOVED" and g.placement_group_id not in self.before
            ]
            for group_id in left:
                _remove_group(group_id)
            if left:
                quiet_since = time.monotonic()
            time.sleep(1.0)


def _state_address() -> str:
    """The connected cluster's address for Ray's state API, which otherwise looks for "the"
    local Ray and refuses to choose when the machine runs several."""
    return ray.get_runtime_context().gcs_address


def _placement_groups() -> list:
    """This driver's job's placement groups (other jobs' are not the sweep's business)."""
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    groups = list_placement_groups(address=_state_address(), detail=True, limit=10_000)
    return [g for g in groups if g.creator_job_id == job]


def _remove_group(group_id: str) -> None:
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def _cluster_resources() -> dict[str, float]:
    return _plain_resources(ray.cluster_resources())


def _plain_resources(resources: dict[str, float]) -> dict[str, float]:
    """CPUs, GPUs and custom resources, without Ray's bookkeeping (memory, node and
    placement-group resources)."""
    return {
        k: round(v, 2)
        for k, v in resources.items()
        if not k.startswith(("node:", "memory", "object_store", "bundle_group_"))
        and "_group_" not in k
    }
