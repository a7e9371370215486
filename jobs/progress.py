"""Progress of work done in Ray Data's tasks (data preparation, audit inference), counted
where the rows are processed, on any node, and followed by the driver.

The driver opens a `Progress` with a `Report` (the CLI's: `raygen.render.StageProgress`) and
runs each stage inside `progress.stage(name, total)`; the stage's functions are given the
yielded `Counter` and call `counter.add(rows)`. The report hears `(stage, done, total)` when
the stage starts, twice a second, and with `done == total` when it ends. Without a report
nothing is counted or started.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Report = Callable[[str, int, int], None]  # (stage, rows done, rows in all)


class _Tally:
    """A Ray actor holding each stage's count."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, stage: str, rows: int) -> None:
        self.counts[stage] = self.counts.get(stage, 0) + rows

    def done(self, stage: str) -> int:
        return self.counts.get(stage, 0)


@dataclass(frozen=True)
class Counter:
    """What a stage's tasks count with (pickled into them); `add` never waits."""

    tally: Any
    stage: str

    def add(self, rows: int) -> None:
        if self.tally is not None and rows:
            self.tally.add.remote(self.stage, rows)


class Progress:
    def __init__(self, report: Report | None):
        self.report = report
        self.tally = None

    def __enter__(self) -> Progress:
        if self.report is not None:
            import ray

            self.tally = ray.remote(num_cpus=0)(_Tally).remote()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tally is not None:
            import ray

            ray.kill(self.tally)

    def _done(self, name: str) -> int:
        import ray

        return ray.get(self.tally.done.remote(name), timeout=10)

    @contextlib.contextmanager
    def stage(self, name: str, total: int) -> Iterator[Counter]:
        """Count the stage `name` of `total` rows while the block runs."""
        if self.tally is None:
            yield Counter(None, name)
            return
        import ray

        stop = threading.Event()

        def follow() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
                    self.report(name, self._done(name), total)

        self.report(name, 0, total)
        watcher = threading.Thread(target=follow, name=f"progress-{name}", daemon=True)
        watcher.start()
        try:
            yield Counter(self.tally, name)
        finally:
            stop.set()
            watcher.join()
        # Ended without an error: every row is done (a task's last `add` may be on its way).
        self.report(name, total, total)
