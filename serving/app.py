"""The Ray Serve application: a FastAPI ingress that batches requests into the model.

`build_app(spec)` is the application builder (`serving.app:build_app` in a Serve config
file; Serve validates the config's `args` into a `DeploySpec`). One deployment holds the
model; Serve autoscales its replicas, and on each replica an engine thread
(`serving/engine.py`) runs the model on batches of concurrent requests. Language models
answer OpenAI's `/v1/completions`, diffusion models `/v1/images/generations`.
"""

# No `from __future__ import annotations`: Serve ships the deployment class to replicas by
# value, where FastAPI must still resolve the routes' annotations (Request) to classes.
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
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygen.serving.api import (
    ApiError,
    CompletionRequest,
    ImageRequest,
    completion_request_for,
    image_request_for,
    parse_body,
)
from raygen.serving.spec import DeploySpec

logger = logging.getLogger("ray.serve")

REDACTED = "[REDACTED]"
COMPLETIONS = "/v1/completions"
IMAGES = "/v1/images/generations"

# /openapi.json and /docs are routes of the deployment: the schema states this
# deployment's own name, limits and model (`ModelServer._openapi`).
api = FastAPI(
    title="raygen model server",
    description="OpenAI-compatible completions (language models) and image generation "
    "(diffusion models) for a raygen-trained model.",
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


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


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


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
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (an unknown path, a method a path does not take) in OpenAI's
    error shape too."""
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def _failure(status: int, error: str) -> ApiError:
    """A generation failure as an API error: the request's fault (4xx) or ours (5xx)."""
    if status < 500:
        return ApiError(status, f"The model cannot take this request: {error}")
    return ApiError(status, f"Generation failed: {error}", kind="server_error")


@serve.deployment(name="model")
@serve.ingress(api)
class ModelServer:
    """One replica: the loaded model plus the HTTP API in front of it."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        from raygen.cluster.storage import local_copy
        from raygen.serving.engine import ImageEngine, TextEngine
        from raygen.serving.gate import serving_clearance
        from raygen.serving.runtimes.common import DIFFUSION, detect_kind
        from raygen.serving.runtimes.images import DiffusionModel
        from raygen.serving.runtimes.text import LanguageModel

        started = time.monotonic()
        self.spec = DeploySpec.model_validate(spec)
        self.audit = serving_clearance(self.spec)  # the gate holds wherever the app runs
        self.keys = _api_keys(self.spec)
        torch.set_num_threads(max(1, int(self.spec.replica.num_cpus)))
        device = "cuda" if self.spec.replica.num_gpus > 0 else "cpu"
        self.kind = detect_kind(self.spec.model)
        local = local_copy(self.spec.model)
        precision = self.spec.replica.precision
        if self.kind == DIFFUSION:
            self.model: Any = DiffusionModel(local, precision, device)
        else:
            self.model = LanguageModel(local, precision, device)
        limits = self.spec.limits
        if self.kind == DIFFUSION:
            facts = self.model
            self.body_model: type = image_request_for(
                self.spec.name,
                limits.max_images,
                facts.num_train_timesteps,
                facts.num_classes,
                f"{facts.shape[2]}x{facts.shape[1]}",
            )
            self.endpoint = IMAGES
        else:
            # No completion fits past the context, whatever the limit says.
            most_tokens = min(limits.max_tokens, self.model.context_length - 1)
            self.body_model = completion_request_for(
                self.spec.name, most_tokens, limits.max_choices
            )
            self.endpoint = COMPLETIONS
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
        if self.kind == DIFFUSION:
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
        limit = self.spec.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"The request body is {declared} bytes; the limit is {limit}.")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"The request body is over the limit of {limit} bytes.")
        body = parse_body(bytes(raw), self.body_model)
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
        if self.endpoint != endpoint:
            raise ApiError(
                404,
                f"`{self.spec.name}` is a {self.kind} model: it does not serve {endpoint}; use "
                f"{self.endpoint}.",
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
        for path in {COMPLETIONS, IMAGES} - {self.endpoint}:  # not this model's kind
            schema["paths"].pop(path, None)
        for parameter in schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
            if parameter["name"] == "model_id":  # the one model this server has
                parameter["schema"] = {"type": "string", "enum": [self.spec.name]}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = self.body_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        operation = schema["paths"][self.endpoint]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
        if self.endpoint == COMPLETIONS:  # `stream: true` answers with server-sent events
            event = {
                "type": "object",
                "description": "A server-sent event: `data` is a completion chunk (JSON), an "
                "error, or `[DONE]` at the end.",
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
        about: dict[str, Any] = {"kind": self.kind, "precision": self.spec.replica.precision}
        if self.kind == LANGUAGE_MODEL:
            about["context_length"] = self.model.context_length
            about["limits"] = {
                "max_prompt_tokens": limits.max_prompt_tokens,
                "max_tokens": limits.max_tokens,
                "max_choices": limits.max_choices,
                "max_body_bytes": limits.max_body_bytes,
            }
        else:
            about["image_size"] = list(self.model.shape[1:])
            about["channels"] = self.model.shape[0]
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
        body: CompletionRequest = await self._read(request, COMPLETIONS)
        body.check(self.spec.limits.max_choices)
        jobs, prompt_tokens = self._text_requests(body)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(response_id, jobs, prompt_tokens, include_usage),
                media_type="text/event-stream",
            )
        async for update in self._generate(jobs, stream=False):
            whole = update
        texts = [delta.text for delta in whole.deltas]
        finish = [delta.finish_reason for delta in whole.deltas]
        tokens = [delta.tokens for delta in whole.deltas]
        batch_size = whole.batch_size
        choices = [_choice(i, *self._filtered(text, finish[i])) for i, text in enumerate(texts)]
        self._count_tokens(sum(tokens))
        content = self._completion(response_id, choices, _usage(prompt_tokens, sum(tokens)))
        return JSONResponse(content, headers={"x-raygen-batch-size": str(batch_size)})

    def _completion(
        self, response_id: str, choices: list[dict[str, Any]], usage: dict[str, int] | None
    ) -> dict[str, Any]:
        """A completion, or one streamed chunk of it, in OpenAI's shape."""
        return {
            "id": response_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.spec.name,
            "choices": choices,
            "usage": usage,
        }

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

            raise _failure(error_status(outcome), describe(outcome))
        images, batch_size = outcome
        from raygen.serving.runtimes.images import png_bytes

        data = [{"b64_json": base64.b64encode(png_bytes(image)).decode()} for image in images]
        return JSONResponse(
            {"created": int(time.time()), "data": data},
            headers={"x-raygen-batch-size": str(batch_size)},
        )

    # --- language models ------------------------------------------------------------

    def _text_requests(self, body: CompletionRequest) -> tuple[list[Any], int]:
        """One generation per (prompt, n) in OpenAI's choice order; checks the limits."""
        from raygen.jobs.seeding import derive_seed
        from raygen.serving.runtimes.text import TextRequest

        limits = self.spec.limits
        prompts = body.prompts()
        jobs, prompt_tokens = [], 0
        context = self.model.context_length
        for p, prompt in enumerate(prompts):
            ids = self.model.encode(prompt)
            param = "prompt" if len(prompts) == 1 else f"prompt.{p}"
            if len(ids) > limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"`{param}` is {len(ids)} tokens; this server allows at most "
                    f"{limits.max_prompt_tokens}.",
                    "prompt",
                )
            if len(ids) + body.max_tokens > context:
                raise ApiError(
                    400,
                    f"`{param}` ({len(ids)} tokens) + `max_tokens` ({body.max_tokens}) is more "
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
                        ids, body.max_tokens, body.temperature, body.top_p, body.stops(), seed
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
        try:
            while True:
                update = await self._within_deadline(
                    updates.get(), started, lambda: self.engine.cancel(ticket)
                )
                if update.error:
                    raise _failure(update.status, update.error)
                yield update
                if update.done:
                    return
        finally:
            self.engine.cancel(ticket)  # no-op once done; else the client went away

    async def _stream(
        self, response_id: str, jobs: list[Any], prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        buffered = self.filter.pattern is not None  # check each choice whole before sending
        texts = [""] * len(jobs)
        tokens = [0] * len(jobs)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body = self._completion(response_id, choices, usage)
            if not include_usage:
                del body["usage"]
            return f"data: {json.dumps(body)}\n\n"

        try:
            async for update in self._generate(jobs, stream=True):
                choices = []
                for i, delta in enumerate(update.deltas):
                    if delta is None:
                        continue
                    tokens[i] = delta.tokens
                    text, reason = delta.text, delta.finish_reason
                    if buffered:
                        texts[i] += text
                        if reason is None:
                            continue
                        text, reason = self._filtered(texts[i], reason)
                    if text or reason:
                        choices.append(_choice(i, text, reason))
                if choices:
                    yield chunk(choices)
        except ApiError as exc:  # the status is sent: the error goes in the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        self._count_tokens(sum(tokens))
        if include_usage:
            yield chunk([], _usage(prompt_tokens, sum(tokens)))
        yield "data: [DONE]\n\n"

    def _count_tokens(self, n: int) -> None:
        # Ray's Counter refuses 0, which a completion ending at once (EOS first) adds.
        if n > 0:
            self.tokens.inc(n)

    def _filtered(self, text: str, reason: str | None) -> tuple[str, str | None]:
        text, matched = self.filter.apply(text)
        if not matched:
            return text, reason
        self.filtered.inc(tags={"action": self.filter.action})
        return text, "content_filter" if self.filter.action == "refuse" else reason


def autoscaling_config(spec: DeploySpec) -> dict[str, Any]:
    """The spec's `autoscaling` section as Serve's autoscaling_config."""
    a = spec.autoscaling
    return {
        "min_replicas": a.min_replicas,
        "initial_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
    }


def build_app(args: DeploySpec | dict[str, Any]) -> serve.Application:
    """The Serve application for a deploy spec (the builder named in Serve config files,
    whose `args` are a resolved deploy spec)."""
    from ray.serve.config import BackpressureConfig

    spec = args if isinstance(args, DeploySpec) else DeploySpec.model_validate(args)
    replica = spec.replica
    return ModelServer.options(
        autoscaling_config=autoscaling_config(spec),
        max_ongoing_requests=replica.max_ongoing_requests,
        # Overload is shed at the proxy, at once: 503 with Retry-After past the queue.
        max_queued_requests=replica.max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=replica.retry_after_s),
        ray_actor_options={"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus},
    ).bind(spec.model_dump(mode="json"))
