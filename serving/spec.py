"""The deploy spec: which model to serve, how it scales, batches, authenticates and limits.

Cheap to import (pydantic only), like the train and sweep specs.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from raygen.jobs.spec import Section


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
    accelerator_type: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The GPU model a replica needs, as Ray names it (A100, H100, L4, A10G...): "
        "replicas run only on nodes of that type. Needs num_gpus > 0.",
    )

    @model_validator(mode="after")
    def _accelerator_needs_a_gpu(self) -> ReplicaSpec:
        if self.accelerator_type and self.num_gpus <= 0:
            raise ValueError(
                f"accelerator_type {self.accelerator_type} is a GPU model: set num_gpus > 0 "
                "(or drop accelerator_type)"
            )
        return self

    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica works on at once (more are queued)."
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="Requests queued for the replicas at each HTTP proxy (Serve's option of "
        "that name); more are refused at once with 503 and `Retry-After`, instead of "
        "waiting in a queue that grows without bound.",
    )
    retry_after_s: float = Field(
        1, ge=0, description="The `Retry-After` (seconds) sent with those 503 answers."
    )
    stall_timeout_s: float = Field(
        60,
        gt=0,
        description="Seconds a replica's model may go without finishing a step while it has "
        "work; then `/healthz` and Serve's health check report it unhealthy, and Serve "
        "replaces it.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Weights' precision on the replica; fp16 needs a GPU."
    )


class BatchingSpec(Section):
    max_batch_size: int = Field(
        8,
        ge=1,
        description="Completions decoded together (language models: requests that arrive "
        "while others run join them at the next token), or images denoised together, at most.",
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="Seconds an idle replica waits after a request for others to start with "
        "it. Under load batches form while the model is busy, without waiting.",
    )


class UpdatesSpec(Section):
    surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="When a running application is deployed again (another model or other "
        "settings), the extra replicas it may start, as a percentage of its replicas (at "
        "least one): new replicas load the model and pass the gate while the old ones keep "
        "answering, so no request goes unanswered; the cluster needs room for them. 0: stop "
        "old replicas before starting new ones (no extra room needed; requests wait for the "
        "new replicas meanwhile).",
    )
    drain_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest a replica being replaced keeps working on the requests and "
        "streams it has; default `http.request_timeout_s`, so every request it took finishes.",
    )


LOOPBACK_HOSTS = ("localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address (127.0.0.0/8, ::1, localhost)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class HttpSpec(Section):
    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP proxy listens on; `0.0.0.0` for every interface "
        "(then `auth.api_keys_env` is required, or `auth.allow_anonymous: true`).",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy.")
    request_timeout_s: float = Field(
        300,
        gt=0,
        description="Longest a request may take, queueing included (Serve's option of that "
        "name); a request not answered by then gets an error and its work stops.",
    )


class AuthSpec(Section):
    api_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding comma-separated API keys; "
        "requests then need `Authorization: Bearer <key>`. Unset: no authentication.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Serve without API keys on an address other machines can reach (a "
        "deliberate choice, e.g. behind an authenticating gateway).",
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


class AuditOverride(Section):
    """Points at a person's decision, on the record, to deploy despite the audit.

    Only a pointer: replicas serve the model only if the deployment record it names exists
    next to the model and overrides the audit of this very model (its sha256)."""

    record: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.json$",
        description="The override's record: a file name in the model's deployment records "
        "(`<run>/deployments/`).",
    )


class PromoteAfterSpec(Section):
    requests: int = Field(
        200, ge=1, description="Requests the canary has answered before it may be promoted."
    )
    seconds: float = Field(
        300, ge=0, description="Seconds since the canary took its first request, at least."
    )


class RollbackIfSpec(Section):
    """Thresholds against the primary arm, over the requests since the canary started.

    A rate is judged crossed when the canary's rate is above the primary's plus the
    threshold even at the low end of its 95% Wilson interval: a few unlucky requests do not
    roll back a good canary, and a canary failing most of its requests is rolled back after
    a handful. Latency is judged once each arm has answered 100 requests (a 99th
    percentile of fewer says little)."""

    error_rate: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Most the canary's share of failed requests (HTTP 5xx) may exceed the "
        "primary's; null: not judged.",
    )
    p99_latency_ms: float | None = Field(
        None,
        gt=0,
        description="Most the canary's 99th-percentile latency may exceed the primary's, in "
        "milliseconds; null: not judged.",
    )
    filtered_rate: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Most the canary's share of answers the output filter matched may exceed "
        "the primary's; null: not judged.",
    )


class CanarySpec(Section):
    """A second model answering a share of the traffic until it is promoted or rolled back."""

    model: str = Field(
        description="The canary's model: a directory or URI, or a registered version "
        "(models:/NAME/VERSION, models:/NAME@ALIAS)."
    )
    audit: str | None = Field(
        None,
        description="The canary's gate, as `audit` is the primary's: an audit spec (YAML) or "
        "the audit.json of a passed audit of this model (default for a registered version: "
        "its last audit).",
    )
    traffic_percent: float = Field(
        gt=0,
        lt=100,
        description="Share of requests the canary answers. A request carrying `user` always "
        "goes to the same model.",
    )
    promote_after: PromoteAfterSpec = Field(
        default_factory=PromoteAfterSpec,
        description="When the canary becomes the primary, if no `rollback_if` threshold was "
        "crossed by then: both conditions must hold.",
    )
    rollback_if: RollbackIfSpec = Field(
        default_factory=RollbackIfSpec,
        description="When the canary is rolled back at once (all traffic to the primary).",
    )
    registered_version: str | None = Field(
        None, description="Written by raygen, as the deploy spec's own field."
    )
    audit_override: AuditOverride | None = Field(
        None, description="Written by raygen, as the deploy spec's own field."
    )


class DeploySpec(Section):
    """A deployment: an exported model behind an autoscaling Ray Serve application."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        max_length=128,
        description="Application name (letters, digits, `-`, `_`).",
    )
    model: str = Field(
        description="An exported model directory or URI (`<run>/model`): a language model or "
        "a diffusion pipeline, told apart by its files; or a registered version, "
        "models:/NAME/VERSION or models:/NAME@ALIAS (its audit is the gate's by default)."
    )
    registered_version: str | None = Field(
        None,
        description="Written by raygen when `model` names a registered version: the version "
        "(models:/NAME/VERSION) the model directory was resolved from, on which each "
        "deployment is recorded.",
    )
    route_prefix: str = Field(
        "/", pattern=r"^/", description="HTTP path prefix of the application."
    )
    audit: str | None = Field(
        None,
        description="The deployment gate (required to deploy): an audit spec (YAML) run on "
        "this model first, or the `audit.json` of a passed audit of this exact model. "
        "Default for a registered version: the last audit recorded on it.",
    )
    audit_override: AuditOverride | None = Field(
        None,
        description="Written by `raygen serve --override-audit REASON` (and `serve build`): "
        "the deployment record of who deployed a model whose audit failed (or does not match "
        "it), when and why. Not for hand-editing: replicas check the record.",
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
    updates: UpdatesSpec = Field(
        default_factory=UpdatesSpec,
        description="How a running application of this name is updated in place.",
    )
    canary: CanarySpec | None = Field(
        None,
        description="A canary rollout: another model (gated like this one) answering a share "
        "of the requests beside it, promoted or rolled back on its figures.",
    )

    @model_validator(mode="after")
    def _keys_where_reachable(self) -> DeploySpec:
        if is_loopback(self.http.host) or self.auth.api_keys_env or self.auth.allow_anonymous:
            return self
        raise ValueError(
            f"http.host is {self.http.host!r}, which other machines can reach, and "
            "auth.api_keys_env is not set: anyone there could use the model. Set "
            "auth.api_keys_env to the variable holding the API keys, or set "
            "auth.allow_anonymous: true to serve without keys on purpose"
        )


PRIMARY = "primary"
CANARY = "canary"
_ARM_FIELDS = ("model", "audit", "audit_override", "registered_version")


def arm_specs(spec: DeploySpec) -> dict[str, DeploySpec]:
    """The deploy spec of each model the application serves: the primary's, and the
    canary's (the primary's settings with the canary's model, gate and record)."""
    arms = {PRIMARY: spec.model_copy(update={"canary": None})}
    if spec.canary is not None:
        canary = {field: getattr(spec.canary, field) for field in _ARM_FIELDS}
        arms[CANARY] = spec.model_copy(update={**canary, "canary": None})
    return arms


def with_arm(spec: DeploySpec, arm: str, armed: DeploySpec) -> DeploySpec:
    """`spec` with one arm's model, gate and record taken from `armed` (`arm_specs`'s)."""
    fields = {field: getattr(armed, field) for field in _ARM_FIELDS}
    if arm == PRIMARY:
        return spec.model_copy(update=fields)
    assert spec.canary is not None
    return spec.model_copy(update={"canary": spec.canary.model_copy(update=fields)})


# --- audits -------------------------------------------------------------------------------


class _Thresholds(Section):
    features: list[str] | None = Field(
        None,
        description="Sensitive features this check compares groups of; default: every one "
        "in `sensitive_features`.",
    )
    max_difference: float | None = Field(
        None, ge=0, description="Largest allowed gap between the best and the worst group."
    )


class QualityCheck(_Thresholds):
    """Quality of service: does the model predict each group's text equally well?"""

    metric: Literal["perplexity", "token_loss"] = Field(
        description="`token_loss`: mean per-token loss of each group's rows; `perplexity`: "
        "exp of it. Lower is better."
    )
    max_ratio: float | None = Field(
        None, ge=1, description="Largest allowed worst-group / best-group value."
    )

    @model_validator(mode="after")
    def _has_threshold(self) -> QualityCheck:
        if self.max_ratio is None and self.max_difference is None:
            raise ValueError(f"{self.metric} check: set max_ratio and/or max_difference")
        return self


class OutcomeCheck(_Thresholds):
    """Outcome disparity: are generations scored positive at the same rate for each group?"""

    metric: Literal["positive_rate"]
    prompt_column: str = Field(description="Column with the prompt the model completes.")
    scorer: str = Field(
        description="`lexicon:PATH` (1 when the completion holds a word of the file, one word "
        "per line, case-insensitive) or `module:function` (str -> 0/1, importable here)."
    )
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens per completion.")
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding.")
    seed: int = Field(0, ge=0, description="Sampling seed (completion i uses seed + i).")
    min_ratio: float | None = Field(
        0.8,
        ge=0,
        le=1,
        description="Smallest allowed demographic parity ratio (lowest / highest positive "
        "rate); 0.8 is the four-fifths rule.",
    )
    max_equalized_odds_difference: float | None = Field(
        None, ge=0, description="With `label_column`: largest allowed equalized odds difference."
    )


class ClassQualityCheck(Section):
    """Per-class quality of a class-conditional image model's samples (diffusion, DiT or
    GAN)."""

    metric: Literal["class_accuracy"]
    classifier: str = Field(
        description="Prepared data dir of the model's training run (its `fid/` holds the "
        "classifier raygen trained on the real images), or that `fid/` dir itself."
    )
    samples_per_class: int = Field(64, ge=1, description="Images generated per class.")
    num_inference_steps: int = Field(
        50, ge=1, description="Denoising steps per image (a GAN generates in one pass)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=1,
        le=100,
        description="Latent diffusion (DiT) models: classifier-free guidance of the audited "
        "images (default 4, as the image API's default).",
    )
    seed: int = Field(0, ge=0, description="Seed of the starting noise.")
    min_ratio: float | None = Field(
        0.8, ge=0, le=1, description="Smallest allowed worst-class / best-class accuracy."
    )
    max_difference: float | None = Field(
        None, ge=0, description="Largest allowed gap between the best and worst class."
    )


Check = Annotated[QualityCheck | OutcomeCheck | ClassQualityCheck, Field(discriminator="metric")]


class AuditSpec(Section):
    """A fairness audit of one model: checks of per-group figures against thresholds."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128, description="Audit name."
    )
    data: str | None = Field(
        None,
        description="Evaluation Parquet file or directory (local or in a bucket) with the text or "
        "prompt column and the sensitive-feature columns; not needed for class_accuracy.",
    )
    text_column: str = Field("text", description="Column with the texts of quality checks.")
    label_column: str | None = Field(
        None, description="Optional 0/1 column: the right outcome of each row."
    )
    sensitive_features: list[str] = Field(
        default_factory=list, description="Columns whose groups are compared."
    )
    min_group_size: int = Field(
        30,
        ge=1,
        description="Groups (and cells of an intersection of features) with fewer rows fail "
        "the check as insufficient evidence.",
    )
    n_boot: int = Field(
        200,
        ge=0,
        le=100_000,
        description="Bootstrap resamples behind each figure's confidence interval (Fairlearn's "
        "MetricFrame); 0: point estimates only.",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the confidence intervals.")
    bootstrap_seed: int = Field(0, description="Random state of the bootstrap.")
    decision: Literal["point", "conservative"] = Field(
        "point",
        description="`point`: a check fails when a point estimate is past its threshold; "
        "`conservative`: also when the estimate's confidence interval reaches past it.",
    )
    max_rows: int | None = Field(
        None, ge=1, description="Use at most this many rows of `data` (the first ones)."
    )
    max_text_tokens: int = Field(
        512, ge=2, description="Longest text scored for loss (longer ones are truncated)."
    )
    batch_size: int = Field(16, ge=1, description="Rows per inference batch.")
    workers: int = Field(2, ge=1, description="Ray actors running inference in parallel.")
    checks: list[Check] = Field(min_length=1, description="What must hold for a pass.")

    @model_validator(mode="after")
    def _intervals_to_decide(self) -> AuditSpec:
        if self.decision == "conservative" and not self.n_boot:
            raise ValueError(
                "decision: conservative judges confidence intervals, and n_boot is 0 (no "
                "intervals); set n_boot (e.g. 200) or decision: point"
            )
        return self
