"""The HTTP API's request bodies and errors, in OpenAI's shapes so existing clients work.

Bodies are validated strictly (no "5" for 5) and every problem becomes a 4xx JSON error
`{"error": {"message", "type", "param", "code"}}` naming the field, as OpenAI's API does.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """A request the API refuses: HTTP status, OpenAI error type, the field, a message."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CompletionRequest(_Body):
    """POST /v1/completions (OpenAI's legacy completions API)."""

    model: str = Field(description="The deployment's name (see GET /v1/models).")
    prompt: str | list[str] = Field(description="A prompt, or a list of prompts.")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate per completion.")
    temperature: float = Field(
        1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy decoding."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: smallest token set with this mass."
    )
    n: int = Field(1, ge=1, description="Completions per prompt.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 sequences that end a completion (not included in it)."
    )
    seed: int | None = Field(
        None, ge=0, description="Makes sampling repeatable: completion i depends on (seed, i)."
    )
    stream: bool = Field(False, description="Send tokens as server-sent events as they come.")
    stream_options: dict[str, bool] | None = Field(
        None, description="`{include_usage: true}`: a last chunk with the token counts."
    )
    user: str | None = Field(None, description="An end-user id (accepted, not used).")
    # Accepted for compatibility only at their defaults.
    echo: bool = Field(False, description="Not supported: must be false.")
    logprobs: int | None = Field(None, description="Not supported: must be null.")
    best_of: int | None = Field(None, description="Not supported: must be null or 1.")
    suffix: str | None = Field(None, description="Not supported: must be null.")
    presence_penalty: float = Field(0.0, description="Not supported: must be 0.")
    frequency_penalty: float = Field(0.0, description="Not supported: must be 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be null.")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check(self) -> None:
        """What pydantic's field constraints cannot say.

        Raises:
            ApiError: 400 naming the field.
        """
        unsupported = {
            "echo": self.echo,
            "logprobs": self.logprobs is not None,
            "best_of": self.best_of not in (None, 1),
            "suffix": self.suffix is not None,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        for name, used in unsupported.items():
            if used:
                raise ApiError(
                    400, f"`{name}` is not supported by this server; leave it out.", name
                )
        if not self.prompts():
            raise ApiError(400, "`prompt` is an empty list; give at least one prompt.", "prompt")
        stops = self.stops()
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "`stop` takes up to 4 non-empty strings.", "stop")
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "`stream_options` is only allowed with `stream: true`.", "stream_options"
            )


class ImageRequest(_Body):
    """POST /v1/images/generations (the shape of OpenAI's images API)."""

    model: str | None = Field(None, description="The deployment's name; optional.")
    n: int = Field(1, ge=1, description="Images to generate.")
    seed: int | None = Field(
        None, ge=0, description="Image i's starting noise depends only on (seed, i)."
    )
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps.")
    class_label: int | None = Field(
        None, ge=0, description="Class of every image (class-conditional models)."
    )
    size: str | None = Field(None, description="`WxH`; must be the model's size if given.")
    response_format: Literal["b64_json"] = Field(
        "b64_json", description="Images come back as base64-encoded PNG."
    )
    prompt: str | None = Field(
        None, description="Not supported: raygen's diffusion models are not text-conditioned."
    )


def parse_body(raw: bytes, model: type[_Body]) -> Any:
    """Validate a JSON request body.

    Raises:
        ApiError: 400 for malformed JSON, wrong types, bad values or unknown fields.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"][:1]) or None
        return_msg = _describe(first)
        raise ApiError(400, f"`{param}`: {return_msg}" if param else return_msg, param) from None


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required."
    if kind == "extra_forbidden":
        return "is not a parameter of this endpoint."
    value = json.dumps(error.get("input"))[:80]
    return f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {value})."
