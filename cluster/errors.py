"""User-facing errors of the cluster layer, and the base class every raygen error shares."""

from __future__ import annotations


class RaygenError(Exception):
    """An error caused by user input or environment, printed without a traceback.

    The CLI catches these once, prints the message and exits with `exit_code`.
    Subclasses keep a plain-string constructor so they pickle across Ray processes.
    """

    exit_code = 2


class StorageError(RaygenError):
    """A storage URI cannot be read or written (missing path, bucket, credentials...)."""


class ClusterError(RaygenError):
    """Ray cannot be reached or cannot provide what a job asks for."""
