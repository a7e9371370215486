"""User-facing errors of sweeps."""

from __future__ import annotations

from raygen.cluster.errors import RaygenError


class SweepInterrupted(RaygenError):
    """The sweep stopped (Ctrl-C) with trials unfinished; its state is saved for --resume."""

    exit_code = 130


class SweepStalled(RaygenError):
    """The sweep's trials waited longer than `run.pending_timeout_s` for resources."""
