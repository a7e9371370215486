"""The HTTP API's request bodies and errors, in OpenAI's shapes so existing clients work.

Every field is bounded here, where the API is defined: the same models validate requests
and write `/openapi.json`, so the schema states exactly what is accepted. The bounds that
depend on the deployment (its name, limits and model) are set per deployment by
`completion_request_for` and `image_request_for`.

Bodies are validated strictly (no "5" for 5) and every problem becomes a 4xx JSON error
`{"error": {"message", "type", "param", "code"}}` naming the field, as OpenAI's API does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's `seed` is a signed 64-bit integer
MAX_N = 128  # OpenAI's cap on `n`
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_USER_CHARS = 512
MAX_LOGPROBS = 5  # alternatives per token: OpenAI's cap for completions
MAX_TOP_LOGPROBS = 20  # and for chat
MAX_MESSAGES = 4096
MAX_JSON_DEPTH = 32  # request bodies nest 3 deep; deeper JSON is refused before validation
UNSUPPORTED = "is not supported by this server; leave it out"


class ApiError(Exception):
    """A request the API refuses: HTTP status, OpenAI error type, the field, a message."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = headers

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
    # What to say, instead of pydantic's words, when a field is refused.
    field_hints: ClassVar[dict[str, str]] = {}


def _unicode(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates (`"\\ud800"`), which are not text: tokenizers
    cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        raise ValueError(f"holds {bad}, a lone UTF-16 surrogate, which is not text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Stop = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="A last chunk with the token counts.")


TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompts = Annotated[list[Text], Field(min_length=1, max_length=MAX_N)]
TokenPrompts = Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_N)]


class _Sampling(_Body):
    """What completions and chat completions share."""

    model: str = Field(max_length=256, description="The deployment's name (GET /v1/models).")
    temperature: float = Field(
        1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy decoding."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: smallest token set with this mass."
    )
    n: int = Field(1, ge=1, le=MAX_N, description="Completions per prompt.")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        None, description="Up to 4 sequences that end a completion (not included in it)."
    )
    seed: Seed | None = Field(
        None, description="Makes sampling repeatable: completion i depends on (seed, i)."
    )
    stream: bool = Field(False, description="Send tokens as server-sent events as they come.")
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
    user: str | None = Field(
        None, max_length=MAX_USER_CHARS, description="An end-user id (accepted, not used)."
    )
    # Accepted for compatibility only at their defaults.
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: must be 0.")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: must be 0.")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(
        None, description="Not supported: must be null or empty."
    )

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check(self, max_choices: int) -> None:
        """What a schema cannot say.

        Raises:
            ApiError: 400 naming the field.
        """
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "`stream_options` is only allowed with `stream: true`.", "stream_options"
            )
        prompts = len(self.prompts())
        if prompts * self.n > max_choices:
            raise ApiError(
                400,
                f"{prompts} prompt(s) x n={self.n} asks for {prompts * self.n} completions; "
                f"this server allows at most {max_choices} per request.",
                "n",
            )

    def prompts(self) -> list[Any]:
        raise NotImplementedError


class CompletionRequest(_Sampling):
    """POST /v1/completions (OpenAI's legacy completions API)."""

    field_hints: ClassVar[dict[str, str]] = {
        name: UNSUPPORTED for name in ("best_of", "suffix", "presence_penalty", "frequency_penalty")
    }

    prompt: Text | Prompts | TokenIds | TokenPrompts = Field(
        description="A prompt, a list of prompts, or prompts as token ids (a list of ids, "
        "or a list of such lists)."
    )
    max_tokens: int = Field(
        16,
        ge=0,
        description="Most tokens to generate per completion; 0 with `echo` scores the prompt only.",
    )
    echo: bool = Field(False, description="Put the prompt before each completion.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Return each token's log-probability and this many most likely tokens "
        "at its position (with `echo`: the prompt's tokens too).",
    )
    # Accepted for compatibility only at their defaults. (Not Literal[1]: that accepts
    # true, which equals 1 in Python.)
    best_of: Annotated[int, Field(ge=1, le=1)] | None = Field(
        None, description="Not supported: must be null or 1."
    )
    suffix: None = Field(None, description="Not supported: must be null.")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def check(self, max_choices: int) -> None:
        super().check(max_choices)
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(
                400,
                "`max_tokens`: 0 generates nothing; it is only useful with `echo: true` (to "
                "score the prompt). Ask for at least 1 token.",
                "max_tokens",
            )


class TextPart(_Body):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: Text


class Message(_Body):
    """One turn of a conversation."""

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who says it (`developer` is read as `system`)."
    )
    content: Text | Annotated[list[TextPart], Field(min_length=1)] = Field(
        description="Text, or a list of text parts (joined)."
    )
    name: str | None = Field(None, max_length=256, description="Accepted, not used.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions (OpenAI's chat completions API)."""

    field_hints: ClassVar[dict[str, str]] = {
        name: UNSUPPORTED
        for name in (
            "presence_penalty",
            "frequency_penalty",
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "response_format",
            "audio",
            "modalities",
            "prediction",
            "reasoning_effort",
        )
    }

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description="The conversation so far; the model answers as the assistant."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens per answer (OpenAI's older name)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens per answer.")
    logprobs: bool = Field(False, description="Return each answer token's log-probability.")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With `logprobs`: this many most likely tokens at each position.",
    )

    def prompts(self) -> list[list[dict[str, str]]]:
        """The one conversation, as `{role, content}` turns for a chat template."""
        roles = {"developer": "system"}
        return [[{"role": roles.get(m.role, m.role), "content": m.text()} for m in self.messages]]

    def most_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def check(self, max_choices: int) -> None:
        super().check(max_choices)
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(
                400,
                "Give `max_completion_tokens` or `max_tokens` (its older name), not both.",
                "max_tokens",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`.", "top_logprobs")


class ImageRequest(_Body):
    """POST /v1/images/generations (the shape of OpenAI's images API)."""

    field_hints: ClassVar[dict[str, str]] = {
        "prompt": "is not supported: this diffusion model is not text-conditioned; use "
        "`class_label` for a class-conditional model"
    }

    model: str | None = Field(None, max_length=256, description="The deployment's name.")
    n: int = Field(1, ge=1, description="Images to generate.")
    seed: Seed | None = Field(None, description="Image i depends only on (seed, i).")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps.")
    class_label: int | None = Field(
        None, ge=0, description="Class of every image (class-conditional models)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=1,
        le=100,
        description="Classifier-free guidance (latent diffusion models; 1: none; default 4).",
    )
    size: str | None = Field(None, description="`WxH`; must be the model's size if given.")
    response_format: Literal["b64_json"] = Field(
        "b64_json", description="Images come back as base64-encoded PNG."
    )
    prompt: None = Field(
        None, description="Not supported: raygen's diffusion models are not text-conditioned."
    )


def completion_request_for(
    name: str, max_tokens: int, max_choices: int, vocab_size: int
) -> type[CompletionRequest]:
    """The completion body of one deployment: its name, its limits on `max_tokens`
    (already capped by the model's context) and on completions per request, and its
    vocabulary (token ids)."""
    most = max(1, max_tokens)
    choices = min(MAX_N, max_choices)
    token = Annotated[int, Field(ge=0, le=vocab_size - 1)]
    ids = Annotated[list[token], Field(min_length=1)]  # type: ignore[valid-type]
    return create_model(
        "CompletionRequest",
        __base__=CompletionRequest,
        model=(
            str,
            Field(description="The deployment's name.", json_schema_extra={"enum": [name]}),
        ),
        max_tokens=(
            int,
            Field(
                min(16, most),
                ge=0,
                le=most,
                description="Most tokens per completion; 0 with `echo` scores the prompt only.",
            ),
        ),
        n=(int, Field(1, ge=1, le=choices, description="Completions per prompt.")),
        prompt=(
            Text
            | Annotated[list[Text], Field(min_length=1, max_length=choices)]
            | ids
            | Annotated[list[ids], Field(min_length=1, max_length=choices)],  # type: ignore[valid-type]
            Field(
                description=f"A prompt, a list of prompts, or prompts as token ids (a list of "
                f"ids, or a list of such lists); prompts x n <= {choices}."
            ),
        ),
    )


def chat_request_for(name: str, max_tokens: int, max_choices: int) -> type[ChatRequest]:
    """The chat body of one deployment: its name and limits."""
    most = max(1, max_tokens)
    choices = min(MAX_N, max_choices)
    limit = (int | None, Field(None, ge=1, le=most, description="Most tokens per answer."))
    return create_model(
        "ChatRequest",
        __base__=ChatRequest,
        model=(
            str,
            Field(description="The deployment's name.", json_schema_extra={"enum": [name]}),
        ),
        max_tokens=limit,
        max_completion_tokens=limit,
        n=(int, Field(1, ge=1, le=choices, description="Answers to generate.")),
    )


def image_request_for(
    name: str, max_images: int, max_steps: int, num_classes: int, size: str, guides: bool
) -> type[ImageRequest]:
    """The image body of one deployment: its name, limits and model (timesteps, classes,
    image size, whether it takes a guidance scale)."""
    if num_classes:
        label: Any = (
            int | None,
            Field(None, ge=0, le=num_classes - 1, description="Class of every image."),
        )
        hints = ImageRequest.field_hints
    else:
        label = (None, Field(None, description="Not accepted: the model is unconditional."))
        unconditional = "this model is unconditional; leave it out"
        hints = {**ImageRequest.field_hints, "class_label": unconditional}
    if guides:
        guidance: Any = (float | None, ImageRequest.model_fields["guidance_scale"])
    else:
        guidance = (None, Field(None, description="Not accepted: the model has no guidance."))
        hints = {
            **hints,
            "guidance_scale": "this model has no classifier-free guidance (latent diffusion "
            "models do); leave it out",
        }
    model = create_model(
        "ImageRequest",
        __base__=ImageRequest,
        model=(
            str | None,
            Field(
                None, description="The deployment's name.", json_schema_extra={"enum": [name, None]}
            ),
        ),
        n=(int, Field(1, ge=1, le=max_images, description="Images to generate.")),
        num_inference_steps=(
            int,
            Field(min(50, max_steps), ge=1, le=max_steps, description="Denoising steps."),
        ),
        class_label=label,
        guidance_scale=guidance,
        size=(Literal[size] | None, Field(None, description="The model's size, `WxH`.")),  # type: ignore[valid-type]
    )
    model.field_hints = hints
    return model


async def read_body(request: Any, limit: int) -> bytes:
    """A request's body (a Starlette `Request`), refused with 413 past `limit` bytes, by its
    declared length before reading, else as soon as it runs over."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is {declared} bytes; the limit is {limit}.")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"The request body is over the limit of {limit} bytes.")
    return bytes(raw)


def parse_body(raw: bytes, model: type[_Body]) -> Any:
    """Validate a JSON request body.

    Raises:
        ApiError: 400 for malformed or too deeply nested JSON, wrong types, bad values or
        unknown fields.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:  # nested past Python's recursion limit
        data = _TOO_DEEP
    if data is _TOO_DEEP or _depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, f"The request body nests JSON more than {MAX_JSON_DEPTH} levels deep.")
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        param = str(errors[0]["loc"][0]) if errors[0]["loc"] else None
        # Of a union's alternatives, the one that got furthest into the value, else the
        # one of the value's own kind (a list for a list), else one whose type fitted and
        # a bound did not, says most.
        first = max(
            (e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]),
            key=lambda e: (len(e["loc"]), _same_kind(e), not e["type"].endswith("_type")),
        )
        path = ".".join(str(p) for p in first["loc"] if not _union_tag(p)) or None
        hint = model.field_hints.get(param or "")
        if hint:
            message = f"{hint} (got {json.dumps(first.get('input'))[:80]})."
        else:
            message = _describe(first)
        raise ApiError(400, f"`{path}`: {message}" if path else message, param) from None


def _same_kind(error: dict[str, Any]) -> bool:
    listed = any(str(part).startswith("list") for part in error["loc"])
    return isinstance(error.get("input"), list) == listed


def _union_tag(part: Any) -> bool:
    """Whether a part of pydantic's error location names a union's alternative (`str`,
    `list[str]`...) rather than a field or an index."""
    return isinstance(part, str) and (
        any(c in part for c in "[(") or part in ("str", "int", "float", "bool", "none")
    )


_TOO_DEEP = object()


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack += [(child, depth + 1) for child in item]
    return deepest


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required."
    if kind == "extra_forbidden":
        return "is not a parameter of this endpoint."
    value = json.dumps(error.get("input"))[:80]
    text = error["msg"].removeprefix("Value error, ")
    return f"{text[:1].lower()}{text[1:]} (got {value})."
