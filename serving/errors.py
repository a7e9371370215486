"""User-facing errors of serving: deployments that cannot start or be found."""

from __future__ import annotations

from raygen.cluster.errors import RaygenError


class DeployError(RaygenError):
    """A deployment could not start, or names an application that does not exist."""


class AuditFailed(RaygenError):
    """An audit's checks failed, or no passed audit of this exact model exists: the model
    must not be deployed (exit code 3)."""

    exit_code = 3
