"""The deploy spec: which model to serve, how it scales, batches, authenticates and limits.

Cheap to import (pydantic only), like the train and sweep specs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.spec import Section


class AutoscalingSpec(Section):
    min_replicas: int = Field(
        1,
        ge=0,
        description="Fewest replicas; 0 scales to zero when idle (the first request then "
        "waits for a cold start).",
    )
    max_replicas: int = Field(1, ge=1, description="Most replicas under load.")
    target_ongoing_requests: float = Field(
        2, gt=0, description="Requests in flight per replica that Serve scales to keep."
    )
    upscale_delay_s: float = Field(
        30, ge=0, description="Seconds of sustained load before adding replicas."
    )
    downscale_delay_s: float = Field(
        600, ge=0, description="Seconds of low load before removing replicas."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas "
                f"({self.max_replicas}); raise max_replicas"
            )
        return self


class ReplicaSpec(Section):
    num_cpus: float = Field(1, gt=0, description="CPUs per replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (fractions allowed).")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica accepts at once (more are queued)."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Weights' precision on the replica; fp16 needs a GPU."
    )


class BatchingSpec(Section):
    max_batch_size: int = Field(
        8, ge=1, description="Concurrent requests run as one forward pass, at most."
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Seconds a request waits for others to fill a batch."
    )


class HttpSpec(Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy.")


class AuthSpec(Section):
    api_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding comma-separated API keys; "
        "requests then need `Authorization: Bearer <key>`. Unset: no authentication.",
    )


class LimitsSpec(Section):
    max_prompt_tokens: int = Field(1024, ge=1, description="Longest prompt accepted, in tokens.")
    max_tokens: int = Field(256, ge=1, description="Largest `max_tokens` a request may ask.")
    max_choices: int = Field(
        16, ge=1, description="Most completions one request may ask for (prompts x n)."
    )
    max_images: int = Field(8, ge=1, description="Most images one request may ask for.")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body accepted, in bytes."
    )


class FiltersSpec(Section):
    blocklist: list[str] = Field(
        default_factory=list,
        description="Words or regular expressions (case-insensitive) not allowed in outputs.",
    )
    action: Literal["redact", "refuse"] = Field(
        "redact",
        description="`redact`: replace matches with [REDACTED]; `refuse`: withhold the whole "
        "completion (empty text, finish_reason `content_filter`, as OpenAI's API does).",
    )

    @field_validator("blocklist")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return patterns


class DeploySpec(Section):
    """A deployment: an exported model behind an autoscaling Ray Serve application."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        max_length=128,
        description="Application name (letters, digits, `-`, `_`).",
    )
    model: str = Field(
        description="An exported model directory or URI (`<run>/model`): a language model or "
        "a diffusion pipeline, told apart by its files."
    )
    route_prefix: str = Field(
        "/", pattern=r"^/", description="HTTP path prefix of the application."
    )
    audit: str | None = Field(
        None,
        description="The deployment gate: an audit spec (YAML) run on this model before it is "
        "served, or the `audit.json` of a passed audit of this exact model.",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Replica autoscaling (Serve's config)."
    )
    replica: ReplicaSpec = Field(default_factory=ReplicaSpec, description="Each replica.")
    batching: BatchingSpec = Field(
        default_factory=BatchingSpec, description="Dynamic batching of concurrent requests."
    )
    http: HttpSpec = Field(default_factory=HttpSpec, description="Where the API listens.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API keys.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Request limits.")
    filters: FiltersSpec = Field(
        default_factory=FiltersSpec, description="Post-generation output filtering."
    )
