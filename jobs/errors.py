"""User-facing errors of training jobs."""

from __future__ import annotations

from raygen.cluster.errors import RaygenError


class SpecError(RaygenError):
    """A spec is invalid. Carries every problem found, each naming its key path and the fix."""

    def __init__(self, source: str, problems: list[str] | str):
        self.source = source
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(source, self.problems)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.source} has {len(self.problems)} problems:\n{lines}"


class TrainingFailed(RaygenError):
    """A training run ended in an error after it started (its run dir says more)."""

    exit_code = 1
