"""Where a model's audits and deployment records live (its identity, `model_sha256`, is
the jobs package's)."""

from __future__ import annotations


def model_home(model: str) -> str:
    """The directory holding a model's audits and deployment records: `<run>` for a model
    at `<run>/model`."""
    model = model.rstrip("/")
    return model.rsplit("/", 1)[0] if "/" in model else "."
