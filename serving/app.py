"""The model deployments of a Ray Serve application, and their HTTP API.

The application (built by `serving/router.py`'s `build_app`, `raygen.serving.router:build_app`
in a Serve config file) is one deployment per arm: the primary, the HTTP ingress, and during
a canary rollout the canary, which answers the requests the primary's replicas relay to it.
Each holds a model and answers with the API below; Serve autoscales each arm's replicas,
and on each replica an engine thread (`serving/engine.py`) runs the model on batches of
concurrent requests. Language models answer OpenAI's `/v1/completions` (and
`/v1/chat/completions` when they have a chat template), diffusion models
`/v1/images/generations`.
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations
# (Request) to classes when the class-based view is made.
import asyncio
import base64
import hmac
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve._private.http_util import make_fastapi_class_based_view
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygen.serving.api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ImageRequest,
    chat_request_for,
    completion_request_for,
    image_request_for,
    parse_body,
    read_body,
)
from raygen.serving.relay import note_filtered, relay_messages
from raygen.serving.spec import DeploySpec

logger = logging.getLogger("ray.serve")

REDACTED = "[REDACTED]"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
STREAMED = (COMPLETIONS, CHAT)  # `stream: true` answers with server-sent events

# /openapi.json and /docs are routes of the deployment: the schema states this
# deployment's own name, limits and model (`ModelServer._openapi`).
api = FastAPI(
    title="raygen model server",
    description="OpenAI-compatible completions and chat completions (language models) and "
    "image generation (diffusion models) for a raygen-trained model.",
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


MODEL_SHA256_HEADER = "x-raygen-model-sha256"
ARM_HEADER = "x-raygen-arm"
# This replica's model hash and arm, set when it loads the model; one replica per process.
_served: dict[str, str] = {}


class _AnsweredBy:
    """Every response of a replica (answers, errors, streams) names the model behind it in
    `x-raygen-model-sha256` and its arm (`primary` or `canary`) in `x-raygen-arm`, so
    clients see which model answered across updates and rollouts."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _served:
            await self.app(scope, receive, send)
            return
        headers = [
            (MODEL_SHA256_HEADER.encode(), _served["sha256"].encode()),
            (ARM_HEADER.encode(), _served["arm"].encode()),
        ]

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_named)


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every refusal, in OpenAI's error shape."""

    error: _ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "The request is invalid; `error.param` names the field.",
        401: "Missing or invalid API key.",
        404: "No such model here, or this model does not serve this endpoint.",
        413: "The request body is over the limit.",
        503: "Overloaded, or not answered in time: retry after `Retry-After` seconds.",
    }
    return {s: {"model": ErrorBody, "description": reasons[s]} for s in statuses}


class OutputFilter:
    """The deploy spec's blocklist: redacts matches, or withholds the whole output."""

    def __init__(self, blocklist: list[str], action: str):
        self.pattern = (
            re.compile("|".join(f"(?:{p})" for p in blocklist), re.I) if blocklist else None
        )
        self.action = action

    def apply(self, text: str) -> tuple[str, bool]:
        """(the text to send, whether the blocklist matched)."""
        if self.pattern is None or not self.pattern.search(text):
            return text, False
        if self.action == "refuse":
            return "", True
        return self.pattern.sub(REDACTED, text), True


def _api_keys(spec: DeploySpec) -> list[str]:
    """The API keys from the environment variable the spec names (read on the replica)."""
    name = spec.auth.api_keys_env
    if not name:
        return []
    keys = [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]
    if not keys:
        # Serving without the keys the spec asks for would be open to anyone: refuse.
        raise RuntimeError(
            f"auth.api_keys_env is {name}, but {name} is not set (or empty) on this node; set "
            "it to comma-separated keys where the replicas run."
        )
    return keys


# Registered before the class: serve.ingress takes the app as it is at decoration.
@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (an unknown path, a method a path does not take) in OpenAI's
    error shape too."""
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def failure(status: int, error: str) -> ApiError:
    """A generation failure as an API error: the request's fault (4xx) or ours (5xx)."""
    if status < 500:
        return ApiError(status, f"The model cannot take this request: {error}")
    return ApiError(status, f"Generation failed: {error}", kind="server_error")


class ModelServer:
    """One replica: the loaded model plus the HTTP API in front of it."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        from raygen.cluster.storage import local_copy
        from raygen.serving.engine import ImageEngine, TextEngine
        from raygen.serving.gate import serving_clearance
        from raygen.serving.runtimes.common import IMAGE_KINDS, detect_kind
        from raygen.serving.runtimes.images import image_model
        from raygen.serving.runtimes.text import LanguageModel

        started = time.monotonic()
        self.spec = DeploySpec.model_validate(spec)
        self.audit = serving_clearance(self.spec)  # the gate holds wherever the app runs
        arm = serve.get_replica_context().deployment
        _served.update(sha256=self.audit["model_sha256"], arm=arm)
        self.keys = _api_keys(self.spec)
        torch.set_num_threads(max(1, int(self.spec.replica.num_cpus)))
        device = "cuda" if self.spec.replica.num_gpus > 0 else "cpu"
        self.kind = detect_kind(self.spec.model)
        local = local_copy(self.spec.model)
        precision = self.spec.replica.precision
        if self.kind in IMAGE_KINDS:
            self.model: Any = image_model(local, self.kind, precision, device)
        else:
            self.model = LanguageModel(local, precision, device)
        limits = self.spec.limits
        # The request body of each endpoint this model serves.
        self.bodies: dict[str, type] = {}
        if self.kind in IMAGE_KINDS:
            facts = self.model
            self.bodies[IMAGES] = image_request_for(
                self.spec.name,
                limits.max_images,
                facts.num_train_timesteps,
                facts.num_classes,
                f"{facts.image_shape[2]}x{facts.image_shape[1]}",
                facts.guides,
            )
        else:
            # No completion fits past the context, whatever the limit says.
            self.most_tokens = min(limits.max_tokens, self.model.context_length - 1)
            self.bodies[COMPLETIONS] = completion_request_for(
                self.spec.name, self.most_tokens, limits.max_choices, self.model.vocab_size
            )
            if self.model.has_chat_template:
                self.bodies[CHAT] = chat_request_for(
                    self.spec.name, self.most_tokens, limits.max_choices
                )
        # Answer before Serve's proxy would cut the request off (it times out on its own
        # clock, which started earlier), so clients get an error they can read.
        self.deadline_s = max(1.0, self.spec.http.request_timeout_s - 1.0)
        self.filter = OutputFilter(self.spec.filters.blocklist, self.spec.filters.action)
        self.batch_sizes = Histogram(
            "raygen_batch_size",
            "Completions decoded together per token, or images denoised together.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        )
        batching = self.spec.batching
        if self.kind in IMAGE_KINDS:
            self.engine: Any = ImageEngine(
                self.model.generate,
                batching.max_batch_size,
                batching.batch_wait_timeout_s,
                self.batch_sizes.observe,
            )
        else:
            self.engine = TextEngine(
                self.model,
                batching.max_batch_size,
                batching.batch_wait_timeout_s,
                self.batch_sizes.observe,
            )
        self.created = int(time.time())
        self.load_s = time.monotonic() - started
        # Serve tags every metric with application, deployment and replica.
        self.tokens = Counter("raygen_completion_tokens", "Tokens generated.")
        self.filtered = Counter(
            "raygen_filtered_outputs", "Outputs the blocklist matched.", tag_keys=("action",)
        )
        # Kept referenced: a metric object that is garbage-collected may never be exported.
        self.load_gauge = Gauge("raygen_model_load_seconds", "Replica start to model loaded.")
        self.load_gauge.set(self.load_s)
        logger.info(
            "raygen: %s loaded %s (%s) in %.1f s",
            self.spec.name,
            self.spec.model,
            self.kind,
            self.load_s,
        )

    async def forward(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[list[dict]]:
        """Answer one request a primary replica relays (`serving/router.py`): the
        response's ASGI messages, as this replica's API sends them, then how it went."""
        async for messages in relay_messages(answering, scope, body):
            yield messages

    def about(self) -> dict[str, Any]:
        """The model this replica serves and its hash (`PrimaryServer.about` gathers them)."""
        return {"model": self.spec.model, "model_sha256": self.audit["model_sha256"]}

    def check_health(self) -> None:
        """Serve's periodic health check (every 10 s): a replica whose engine thread has
        stopped, or has made no progress on its work for `replica.stall_timeout_s`, cannot
        answer, and Serve replaces it. Also re-records the load time: Ray stops exporting
        a gauge that was not recorded for two metric report intervals."""
        problem = self._unhealthy()
        if problem:
            raise RuntimeError(f"{problem}; replace this replica")
        self.load_gauge.set(self.load_s)

    def _unhealthy(self) -> str | None:
        if not self.engine.alive():
            return "the model's engine thread has stopped"
        stalled = self.engine.stalled_for()
        if stalled > self.spec.replica.stall_timeout_s:
            return (
                f"the model has made no progress on its work for {stalled:.0f} s "
                f"(replica.stall_timeout_s is {self.spec.replica.stall_timeout_s:g})"
            )
        return None

    # --- plumbing -------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = False
        for key in self.keys:  # compare with every key: timing says nothing about which
            ok |= hmac.compare_digest(given.strip().encode(), key.encode())
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(
                401,
                "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def _read(self, request: Request, endpoint: str) -> Any:
        """The request's body, validated, once its key and endpoint are right."""
        self._authorize(request)
        self._require(endpoint)
        raw = await read_body(request, self.spec.limits.max_body_bytes)
        body = parse_body(raw, self.bodies[endpoint])
        if body.model is not None and body.model != self.spec.name:
            raise ApiError(
                404,
                f"The model `{body.model}` does not exist here; this server serves "
                f"`{self.spec.name}`.",
                "model",
                code="model_not_found",
            )
        return body

    def _require(self, endpoint: str) -> None:
        if endpoint in self.bodies:
            return
        served = " or ".join(self.bodies)
        if endpoint == CHAT and COMPLETIONS in self.bodies:
            raise ApiError(
                404,
                f"`{self.spec.name}` has no chat template, so it does not serve {CHAT}; use "
                f"{COMPLETIONS}, or fine-tune it on conversations (`data.format: chat`, with "
                "`tokenizer.chat_template` for a model without one).",
            )
        raise ApiError(
            404,
            f"`{self.spec.name}` is a {self.kind} model: it does not serve {endpoint}; use "
            f"{served}.",
        )

    async def _within_deadline(self, awaitable: Any, started: float, cancel: Any) -> Any:
        """`awaitable`'s result, or a 503 once the request has taken `deadline_s` (its work
        is then cancelled): no request waits on the engine without a bound."""
        left = self.deadline_s - (time.monotonic() - started)
        try:
            return await asyncio.wait_for(awaitable, timeout=max(0.0, left))
        except asyncio.TimeoutError:
            cancel()
            timeout = self.spec.http.request_timeout_s
            raise ApiError(
                503,
                f"The model did not answer within the server's request timeout ({timeout:g} "
                "s); it is overloaded or the request asks for too much. Retry later, or ask "
                "for fewer tokens.",
                kind="server_error",
                code="timeout",
                headers={"Retry-After": str(math.ceil(self.spec.replica.retry_after_s))},
            ) from None

    # --- routes ---------------------------------------------------------------------

    @api.get("/healthz")
    def healthz(self) -> Response:
        """Ready: this replica has its model loaded and its engine makes progress (503 when
        not); with the requests waiting for the model and the rows it is working on."""
        problem = self._unhealthy()
        about = {
            "status": "unhealthy" if problem else "ready",
            "model": self.spec.name,
            "kind": self.kind,
            "queued": self.engine.queued(),
            "running": self.engine.running,
        }
        if problem:
            about["reason"] = problem
        return JSONResponse(about, status_code=503 if problem else 200)

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> dict[str, Any]:
        """This deployment's OpenAPI schema: its model's name, every bound and enum."""
        return self._openapi(request.scope.get("root_path", ""))

    @api.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=api.title)

    def _openapi(self, root_path: str) -> dict[str, Any]:
        schema = get_openapi(
            title=api.title,
            version="1",
            description=api.description,
            routes=api.routes,
            servers=[{"url": root_path}] if root_path else None,
        )
        for path in {COMPLETIONS, CHAT, IMAGES} - set(self.bodies):  # not served here
            schema["paths"].pop(path, None)
        for parameter in schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
            if parameter["name"] == "model_id":  # the one model this server has
                parameter["schema"] = {"type": "string", "enum": [self.spec.name]}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for endpoint, model in self.bodies.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            operation = schema["paths"][endpoint]["post"]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body}},
            }
            if endpoint in STREAMED:
                event = {
                    "type": "object",
                    "description": "A server-sent event: `data` is a chunk (JSON), an error, "
                    "or `[DONE]` at the end.",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
                operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": event}
        if self.keys:
            schema["components"]["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer"}
            }
            for path, operations in schema["paths"].items():
                if path != "/healthz":
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        return schema

    @api.get("/v1/models", responses=_errors(401))
    def models(self, request: Request) -> dict[str, Any]:
        """The deployed model (OpenAI's model list): what it is, its limits, its audit."""
        self._authorize(request)
        return {"object": "list", "data": [self._model_entry()]}

    @api.get("/v1/models/{model_id}", responses=_errors(401, 404))
    def model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model (OpenAI's model object): this server's, by its name."""
        self._authorize(request)
        if model_id != self.spec.name:
            raise ApiError(
                404,
                f"The model `{model_id}` does not exist here; this server serves "
                f"`{self.spec.name}`.",
                "model",
                code="model_not_found",
            )
        return self._model_entry()

    def _model_entry(self) -> dict[str, Any]:
        from raygen.serving.runtimes.common import LANGUAGE_MODEL

        limits = self.spec.limits
        about: dict[str, Any] = {
            "kind": self.kind,
            "precision": self.spec.replica.precision,
            "endpoints": list(self.bodies),
        }
        if self.kind == LANGUAGE_MODEL:
            about["context_length"] = self.model.context_length
            about["limits"] = {
                "max_prompt_tokens": limits.max_prompt_tokens,
                "max_tokens": limits.max_tokens,
                "max_choices": limits.max_choices,
                "max_body_bytes": limits.max_body_bytes,
            }
        else:
            about["image_size"] = list(self.model.image_shape[1:])
            about["channels"] = self.model.image_shape[0]
            about["num_classes"] = self.model.num_classes
            about["limits"] = {
                "max_images": limits.max_images,
                "max_inference_steps": self.model.num_train_timesteps,
                "max_body_bytes": limits.max_body_bytes,
            }
        about["audit"] = self.audit
        return {
            "id": self.spec.name,
            "object": "model",
            "created": self.created,
            "owned_by": "raygen",
            "raygen": about,
        }

    @api.post(COMPLETIONS, responses=_errors(400, 401, 404, 413, 503))
    async def completions(self, request: Request) -> Response:
        """OpenAI-compatible text completions, streamed as server-sent events if asked."""
        from raygen.serving.responses import TextAnswer

        body: CompletionRequest = await self._read(request, COMPLETIONS)
        body.check(self.spec.limits.max_choices)
        prompts = [p if isinstance(p, list) else self.model.encode(p) for p in body.prompts()]
        logprobs = body.logprobs is not None
        jobs, prompt_tokens = self._text_requests(
            body, prompts, body.max_tokens, body.logprobs, body.echo and logprobs
        )
        echo = None
        if body.echo:
            # Each choice begins with its prompt: as sent; decoded from its tokens when they
            # were sent, or when their log-probabilities' texts must spell it.
            texts = [
                p if isinstance(p, str) and not logprobs else self.model.decode(ids)
                for p, ids in zip(body.prompts(), prompts, strict=True)
            ]
            echo = [text for text in texts for _ in range(body.n)]
        answer = self._shape(TextAnswer, "cmpl", len(jobs), logprobs, echo)
        return await self._answer(body, jobs, prompt_tokens, answer)

    @api.post(CHAT, responses=_errors(400, 401, 404, 413, 503))
    async def chat(self, request: Request) -> Response:
        """OpenAI-compatible chat completions: the conversation rendered with the model's
        chat template, answered as the assistant; streamed as server-sent events if asked."""
        from raygen.serving.responses import ChatAnswer

        body: ChatRequest = await self._read(request, CHAT)
        body.check(self.spec.limits.max_choices)
        (messages,) = body.prompts()
        try:
            prompt = self.model.chat_prompt(messages)
        except Exception as exc:  # the template is code: it may refuse a conversation any way
            raise ApiError(
                400,
                f"The model's chat template cannot render `messages`: {type(exc).__name__}: {exc}",
                "messages",
            ) from None
        ids = self.model.encode(prompt)
        context = self.model.context_length
        if len(ids) >= context:
            raise ApiError(
                400,
                f"`messages` rendered with the chat template is {len(ids)} tokens; the "
                f"model's context is {context}, and the answer needs room. Send a shorter "
                "conversation.",
                "messages",
            )
        # Unless told, an answer may run to the server's limit or the context's end.
        room = min(self.most_tokens, context - len(ids))
        top = (body.top_logprobs or 0) if body.logprobs else None
        jobs, prompt_tokens = self._text_requests(body, [ids], body.most_tokens(room), top, False)
        answer = self._shape(ChatAnswer, "chatcmpl", len(jobs), body.logprobs)
        return await self._answer(body, jobs, prompt_tokens, answer)

    def _shape(
        self, kind: type, prefix: str, choices: int, logprobs: bool, echo: Any = None
    ) -> Any:
        """A response of `kind` (`TextAnswer`, `ChatAnswer`) through this server's output
        filter, which needs each choice whole when it has a blocklist."""
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        buffered = self.filter.pattern is not None
        return kind(response_id, self.spec.name, choices, self._filtered, buffered, logprobs, echo)

    async def _answer(
        self, body: Any, jobs: list[Any], prompt_tokens: int, answer: Any
    ) -> Response:
        """Generate `jobs` and answer in `answer`'s shape: whole, or streamed."""
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(answer, jobs, prompt_tokens, include_usage),
                media_type="text/event-stream",
            )
        async for update in self._generate(jobs, stream=False):
            whole = update
        self._count_tokens(sum(delta.tokens for delta in whole.deltas))
        return JSONResponse(
            answer.whole(whole.deltas, prompt_tokens),
            headers={"x-raygen-batch-size": str(whole.batch_size)},
        )

    @api.post(IMAGES, responses=_errors(400, 401, 404, 413, 503))
    async def images(self, request: Request) -> Response:
        """Generate images (base64 PNG) with a diffusion model."""
        from raygen.serving.runtimes.images import ImageTask as Job

        started = time.monotonic()
        body: ImageRequest = await self._read(request, IMAGES)
        job = Job(
            n=body.n,
            steps=body.num_inference_steps,
            seed=body.seed if body.seed is not None else random.getrandbits(63),
            class_label=body.class_label,
            guidance_scale=body.guidance_scale,
        )
        loop = asyncio.get_running_loop()
        result = loop.create_future()

        def deliver(outcome: Any) -> None:
            loop.call_soon_threadsafe(lambda: result.done() or result.set_result(outcome))

        ticket = self.engine.submit(job, job.n, deliver)
        try:
            outcome = await self._within_deadline(
                result, started, lambda: self.engine.cancel(ticket)
            )
        finally:
            self.engine.cancel(ticket)  # no-op once done; else the client went away
        if isinstance(outcome, Exception):
            from raygen.serving.engine import describe, error_status

            raise failure(error_status(outcome), describe(outcome))
        images, batch_size = outcome
        from raygen.serving.runtimes.images import png_bytes

        data = [{"b64_json": base64.b64encode(png_bytes(image)).decode()} for image in images]
        return JSONResponse(
            {"created": int(time.time()), "data": data},
            headers={"x-raygen-batch-size": str(batch_size)},
        )

    # --- language models ------------------------------------------------------------

    def _text_requests(
        self,
        body: Any,
        prompts: list[list[int]],
        max_tokens: int,
        logprobs: int | None,
        echo_logprobs: bool,
    ) -> tuple[list[Any], int]:
        """One generation per (prompt, n) in OpenAI's choice order; checks the limits."""
        from raygen.jobs.seeding import derive_seed
        from raygen.serving.runtimes.text import TextRequest

        limits = self.spec.limits
        jobs, prompt_tokens = [], 0
        context = self.model.context_length
        name = "messages" if isinstance(body, ChatRequest) else "prompt"
        for p, ids in enumerate(prompts):
            param = name if len(prompts) == 1 else f"{name}.{p}"
            if len(ids) > limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"`{param}` is {len(ids)} tokens; this server allows at most "
                    f"{limits.max_prompt_tokens}.",
                    name,
                )
            if len(ids) + max_tokens > context:
                raise ApiError(
                    400,
                    f"`{param}` ({len(ids)} tokens) + `max_tokens` ({max_tokens}) is more "
                    f"than the model's context of {context} tokens; shorten the prompt or lower "
                    "max_tokens.",
                    "max_tokens",
                )
            prompt_tokens += len(ids)
            for k in range(body.n):
                # Completion i of the response depends only on (seed, i): jobs/seeding.py.
                seed = None if body.seed is None else derive_seed(body.seed, p * body.n + k)
                jobs.append(
                    TextRequest(
                        ids,
                        max_tokens,
                        body.temperature,
                        body.top_p,
                        body.stops(),
                        seed,
                        logprobs,
                        echo_logprobs,
                    )
                )
        return jobs, prompt_tokens

    async def _generate(self, jobs: list[Any], stream: bool) -> AsyncIterator[Any]:
        """The engine's `Update`s for one request's completions: every step's if streamed,
        else one with the whole completions. Stops the generation if the client leaves."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        ticket = self.engine.submit(
            jobs, lambda update: loop.call_soon_threadsafe(updates.put_nowait, update), stream
        )
        failed = None  # a failure that came in behind steps not yet handed on
        try:
            while True:
                update = failed or await self._within_deadline(
                    updates.get(), started, lambda: self.engine.cancel(ticket)
                )
                failed = None
                # Steps that came in while the last was being sent go on as one: under load
                # a stream sends fewer, fuller chunks instead of falling behind.
                while not (update.done or update.error or updates.empty()):
                    later = updates.get_nowait()
                    if later.error:
                        failed = later
                        break
                    update = update.then(later)
                if update.error:
                    raise failure(update.status, update.error)
                yield update
                if update.done:
                    return
        finally:
            self.engine.cancel(ticket)  # no-op once done; else the client went away

    async def _stream(
        self, answer: Any, jobs: list[Any], prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        from raygen.serving.responses import usage

        tokens = [0] * len(jobs)

        def chunk(choices: list[dict[str, Any]], counts: dict[str, int] | None = None) -> str:
            body = answer.envelope(choices, chunk=True)
            if include_usage:
                body["usage"] = counts
            return f"data: {json.dumps(body)}\n\n"

        opening = answer.opening()
        if opening:
            yield chunk(opening)
        try:
            async for update in self._generate(jobs, stream=True):
                for i, delta in enumerate(update.deltas):
                    if delta is not None:
                        tokens[i] = delta.tokens
                choices = answer.step(update.deltas)
                if choices:
                    yield chunk(choices)
        except ApiError as exc:  # the status is sent: the error goes in the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        self._count_tokens(sum(tokens))
        if include_usage:
            yield chunk([], usage(prompt_tokens, sum(tokens)))
        yield "data: [DONE]\n\n"

    def _count_tokens(self, n: int) -> None:
        # Ray's Counter refuses 0, which a completion ending at once (EOS first) adds.
        if n > 0:
            self.tokens.inc(n)

    def _filtered(self, text: str, reason: str | None) -> tuple[str, str | None, bool]:
        text, matched = self.filter.apply(text)
        if not matched:
            return text, reason, False
        self.filtered.inc(tags={"action": self.filter.action})
        note_filtered()
        return text, "content_filter" if self.filter.action == "refuse" else reason, True


# The routes are ModelServer's methods: FastAPI gets the replica answering (`self`) from
# Serve's replica context, as `serve.ingress` arranges for an ingress. Made here once for
# both arms: the primary's replicas (`serving/router.py`'s `PrimaryServer`, the ingress)
# run `api` for every request they answer, the canary's for every request relayed to
# `ModelServer.forward`.
make_fastapi_class_based_view(api, ModelServer)
# A plain class, importable by name: replicas import this module rather than receive a
# copy of the class, so the module's state (`api`, `_served`) is the replica's own.
model_deployment = serve.deployment(ModelServer, name="model")
# What a replica answers with: the API, its answers naming the model and arm behind them.
answering = _AnsweredBy(api)
