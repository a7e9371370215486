"""The application's HTTP ingress: relays each request to the model deployment that answers
it, the primary or, during a canary rollout, the canary, and measures each arm.

Every raygen application is this router in front of one model deployment per arm
(`serving/app.py`'s `ModelServer`, each autoscaled on its own). The router holds no model:
it reads the request, picks the arm (a request carrying `user` always lands on the same
one), hands the request to that arm's replica, which answers it with the whole API (limits,
errors, streams), and relays the answer with `x-raygen-arm` added.
"""

# No `from __future__ import annotations`: as in app.py, FastAPI resolves the routes'
# annotations on the replicas.
import asyncio
import hashlib
import json
import logging
import math
import random
import threading
import time
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygen.serving.api import ApiError, read_body
from raygen.serving.app import failure, http_error, model_deployment
from raygen.serving.relay import OUTCOME
from raygen.serving.spec import CANARY, PRIMARY, DeploySpec, arm_specs, with_arm

logger = logging.getLogger("ray.serve")

ARM_HEADER = "x-raygen-arm"
LATENCIES_KEPT = 10_000  # per arm: enough for a 99th percentile of the recent requests

relay_api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
# A method no route takes is refused here, in OpenAI's error shape as the arms refuse.
relay_api.add_exception_handler(StarletteHTTPException, http_error)


class ArmFigures:
    """What one arm answered since the rollout began: requests, failures (5xx), answers the
    output filter matched, and latencies (seconds, the most recent LATENCIES_KEPT)."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.filtered = 0
        self.latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)

    def add(self, status: int, seconds: float, filtered: bool) -> None:
        self.requests += 1
        self.errors += status >= 500
        self.filtered += filtered
        self.latencies.append(seconds)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            if not ordered:
                return None
            return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "filtered": self.filtered,
            "filtered_rate": self.filtered / self.requests if self.requests else None,
            "p50_ms": quantile(0.5),
            "p99_ms": quantile(0.99),
        }


Z_95 = 1.645  # one-sided 95%: a canary is judged worse only on that much evidence
MIN_RATE_SAMPLES = 10  # canary requests before its rates are judged at all
MIN_LATENCY_SAMPLES = 100  # a 99th percentile of fewer requests says little
PROMOTE, ROLLBACK = "promote", "rollback"


def wilson_low(events: int, n: int, z: float = Z_95) -> float:
    """The low end of the Wilson score interval of a rate of `events` in `n`."""
    if n == 0:
        return 0.0
    rate = events / n
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def judge(
    canary: Any, primary: ArmFigures, tried: ArmFigures, seconds: float
) -> tuple[str, str] | None:
    """The rollout's decision on its figures so far: (ROLLBACK or PROMOTE, why), or None to
    keep measuring. `canary` is the spec's CanarySpec; `tried` the canary's figures.

    A rate threshold is crossed, once the canary has MIN_RATE_SAMPLES requests, when its
    rate is above the primary's plus the threshold even at the low end of its Wilson
    interval; latency, once both arms have
    MIN_LATENCY_SAMPLES requests, when the canary's p99 is above the primary's plus the
    threshold. Promotion needs `promote_after` (requests and seconds) and nothing crossed.
    """
    limits = canary.rollback_if
    rates = (
        ("error rate", limits.error_rate, tried.errors, primary.errors),
        ("filtered-output rate", limits.filtered_rate, tried.filtered, primary.filtered),
    )
    for what, threshold, events, primary_events in rates:
        if threshold is None or tried.requests < MIN_RATE_SAMPLES:
            continue
        baseline = primary_events / primary.requests if primary.requests else 0.0
        low = wilson_low(events, tried.requests)
        if low > baseline + threshold:
            return ROLLBACK, (
                f"the canary's {what} is {events}/{tried.requests} (at least {low:.3f} at 95% "
                f"confidence), over the primary's {baseline:.3f} + {threshold:g}"
            )
    budget = limits.p99_latency_ms
    enough = min(len(tried.latencies), len(primary.latencies)) >= MIN_LATENCY_SAMPLES
    if budget is not None and enough:
        p99, baseline_p99 = tried.summary()["p99_ms"], primary.summary()["p99_ms"]
        if p99 > baseline_p99 + budget:
            return ROLLBACK, (
                f"the canary's p99 latency is {p99:.0f} ms, over the primary's "
                f"{baseline_p99:.0f} ms + {budget:g} ms"
            )
    after = canary.promote_after
    if tried.requests >= after.requests and seconds >= after.seconds:
        return PROMOTE, (
            f"the canary answered {tried.requests} requests over {seconds:.0f} s within every "
            "threshold"
        )
    return None


def arm_for(user: str | None, canary_percent: float) -> str:
    """The arm of one request: by a hash of `user` when given (the same user, the same
    model), else at random; `canary_percent` of requests land on the canary."""
    if user is None:
        draw = random.random() * 100
    else:
        draw = int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") / 2**64 * 100
    return CANARY if draw < canary_percent else PRIMARY


def _user_of(body: bytes) -> str | None:
    """The request's `user` (OpenAI's end-user id), if its body is a JSON object with one."""
    if b'"user"' not in body:
        return None
    try:
        user = json.loads(body).get("user")
    except (ValueError, AttributeError):
        return None
    return user if isinstance(user, str) else None


def _portable(scope: dict[str, Any]) -> dict[str, Any]:
    """The parts of an ASGI scope another process can rebuild the request from."""
    keep = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
            "query_string", "root_path", "headers", "client", "server")  # fmt: skip
    return {key: scope[key] for key in keep if key in scope}


class Relayed(Response):
    """An arm's answer, relayed as it comes (a stream chunk by chunk), with the arm named;
    reports how it went when it ends. `first` is the arm's first list of messages (the
    response's start and what came with it), `rest` the generator of the next ones."""

    def __init__(self, first: list[dict], rest: Any, arm: str, done: Any):
        self.first, self.rest, self.arm, self.done = first, rest, arm, done
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        start, *pending = self.first
        status = start["status"]
        headers = [*start.get("headers", []), (ARM_HEADER.encode(), self.arm.encode())]
        streamed = (b"content-type", b"text/event-stream") in {
            (k.lower(), v.split(b";")[0]) for k, v in headers
        }
        await send({"type": "http.response.start", "status": status, "headers": headers})
        filtered, ended, failed, told = False, False, False, False
        try:
            while True:
                for message in pending:
                    if message["type"] == OUTCOME:
                        filtered, told = message["filtered"], True
                    elif not ended:
                        await send(message)
                        ended = not message.get("more_body", False)
                if failed or told:  # the OUTCOME comes last: no need to ask for the end
                    break
                try:
                    pending = await self.rest.__anext__()
                except StopAsyncIteration:  # after the body, the arm's OUTCOME
                    break
                except Exception as exc:  # noqa: BLE001 - the arm failed mid-answer
                    logger.warning("raygen: the %s arm failed mid-answer: %s", self.arm, exc)
                    status, failed = 500, True
                    error = failure(500, str(exc))
                    # A stream says so in an event; a body cut short is its own sign.
                    tail = f"data: {json.dumps(error.body())}\n\n" if streamed else ""
                    pending = [{"type": "http.response.body", "body": tail.encode()}]
        finally:
            if not ended:
                self.rest.cancel()  # the client left: the arm stops working on it
            self.done(status, filtered)


def _app_status(name: str) -> str:
    app = serve.status().applications.get(name)
    return str(getattr(app.status, "value", app.status)) if app else "NOT_STARTED"


def _redeploy(name: str, spec: DeploySpec, promoting: bool = False) -> None:
    """Deploy `spec` as application `name` from inside it, without waiting (the caller is
    one of the replicas the new version replaces)."""
    target = serve.RunTarget(
        application(spec, promoting), name=name, route_prefix=spec.route_prefix
    )
    serve.run_many([target], wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)  # fmt: skip


def _record_decision(spec: DeploySpec, app: str, decision: dict[str, Any]) -> None:
    """The decision, with its figures, in both models' deployment records and on the
    versions each was registered as."""
    from raygen.jobs.model_hash import model_sha256
    from raygen.jobs.registry import record_on_versions, record_rollout
    from raygen.serving.gate import write_record

    arms = arm_specs(spec)
    entry = {
        "name": app,
        **decision,
        "primary": arms[PRIMARY].model,
        "canary": arms[CANARY].model,
    }
    event = "canary_promoted" if decision["action"] == PROMOTE else "canary_rolled_back"
    for arm, armed in arms.items():
        write_record(armed.model, event, entry)
        on_arm = {**entry, "arm": arm}
        record_on_versions(
            armed.model,
            model_sha256(armed.model),
            lambda version, on_arm=on_arm: record_rollout(version, on_arm),
            "canary decision",
        )


# Defined before the Router: Serve pickles the class when it is decorated, with the module
# globals its methods use as they are at that moment.


@serve.deployment(name="router")
@serve.ingress(relay_api)
class Router:
    """The application's ingress: one per application, holding no model."""

    def __init__(self, spec: dict[str, Any], arms: dict[str, Any], promoting: bool = False):
        self.spec = DeploySpec.model_validate(spec)
        self.arms = arms  # arm -> DeploymentHandle of its ModelServer
        self.name = serve.get_replica_context().app_name
        self.limit = self.spec.limits.max_body_bytes
        self.retry_after = str(math.ceil(self.spec.replica.retry_after_s))
        self.started = time.time()
        self.figures = {arm: ArmFigures() for arm in arms}
        self.decision: dict[str, Any] | None = None
        if promoting:
            # The second step of a promotion (`_enact`): the canary answers everything
            # until the primary deployment runs its model too; then the canary goes.
            self.canary_percent = 100.0
            threading.Thread(target=self._finish_promotion, daemon=True).start()
        else:
            self.canary_percent = self.spec.canary.traffic_percent if self.spec.canary else 0.0
        self.measuring = self.spec.canary is not None and not promoting
        self.requests = Counter(
            "raygen_arm_requests",
            "Requests each arm answered, by outcome (ok, client_error, error).",
            tag_keys=("arm", "outcome"),
        )
        self.latency = Histogram(
            "raygen_arm_latency_ms",
            "Each arm's request latency (streams: to their last chunk), in milliseconds.",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
            tag_keys=("arm",),
        )
        self.filtered = Counter(
            "raygen_arm_filtered_outputs",
            "Answers the output filter matched, by arm.",
            tag_keys=("arm",),
        )

    async def about(self) -> dict[str, Any]:
        """What the application serves: its spec and, per arm, the model's hash and figures
        (`raygen serve` updates and `raygen serve status` read it)."""
        hashes = await asyncio.gather(*(h.about.remote() for h in self.arms.values()))
        arms = {
            arm: {
                "model": about["model"],
                "model_sha256": about["model_sha256"],
                **self.figures[arm].summary(),
            }
            for arm, about in zip(self.arms, hashes, strict=True)
        }
        return {
            "spec": self.spec.model_dump(mode="json"),
            "model": arms[PRIMARY]["model"],
            "model_sha256": arms[PRIMARY]["model_sha256"],
            "arms": arms,
            "canary_percent": self.canary_percent,
            "measuring": self.measuring,
            "decision": self.decision,
            "since": self.started,
        }

    def _record(self, arm: str, status: int, started: float, filtered: bool) -> None:
        seconds = time.monotonic() - started
        self.figures[arm].add(status, seconds, filtered)
        outcome = "error" if status >= 500 else "client_error" if status >= 400 else "ok"
        self.requests.inc(tags={"arm": arm, "outcome": outcome})
        self.latency.observe(1000 * seconds, tags={"arm": arm})
        if filtered:
            self.filtered.inc(tags={"arm": arm})
        if self.measuring and arm == CANARY:
            assert self.spec.canary is not None
            since = time.time() - self.started
            verdict = judge(self.spec.canary, self.figures[PRIMARY], self.figures[CANARY], since)
            if verdict is not None:
                self._decide(*verdict, by="raygen")

    async def decide(self, action: str, by: str) -> dict[str, Any]:
        """`raygen serve promote|rollback NAME`: decide the rollout by hand. Returns the
        decision, or {"error": why} when there is no rollout to decide."""
        if not self.measuring:
            state = f"decided: {self.decision['action']}" if self.decision else "no canary"
            return {
                "error": f"{self.name} has no canary rollout to decide ({state}); deploy a spec "
                "with `canary` to start one."
            }
        verb = "promoted" if action == PROMOTE else "rolled back"
        return self._decide(action, f"{verb} by hand", by=by)

    def _decide(self, action: str, reason: str, by: str) -> dict[str, Any]:
        """Act on a decision at once (all traffic to the model kept), record it with the
        figures behind it, and redeploy the application without the model let go."""
        self.measuring = False
        self.canary_percent = 100.0 if action == PROMOTE else 0.0
        self.decision = {
            "action": action,
            "reason": reason,
            "by": by,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self.started, 1),
            "figures": {arm: figures.summary() for arm, figures in self.figures.items()},
        }
        logger.info("raygen: %s: canary %s: %s", self.name, action, reason)
        threading.Thread(target=self._enact, args=(dict(self.decision),), daemon=True).start()
        return self.decision

    def _enact(self, decision: dict[str, Any]) -> None:
        try:
            _record_decision(self.spec, self.name, decision)
            if decision["action"] == ROLLBACK:
                _redeploy(self.name, self.spec.model_copy(update={"canary": None}))
            else:  # first the primary deployment takes the canary's model (`promoting`)
                promoted = with_arm(self.spec, PRIMARY, arm_specs(self.spec)[CANARY])
                _redeploy(self.name, promoted, promoting=True)
        except Exception:  # noqa: BLE001 - nothing to answer to: the log says what failed
            logger.exception("raygen: %s: enacting the canary decision failed", self.name)

    def _finish_promotion(self) -> None:
        """Once the whole application runs (the primary deployment on the canary's model),
        send everything to the primary and redeploy without the canary."""
        try:
            while _app_status(self.name) != "RUNNING":
                time.sleep(1)
            self.canary_percent = 0.0
            _redeploy(self.name, self.spec.model_copy(update={"canary": None}))
        except Exception:  # noqa: BLE001
            logger.exception("raygen: %s: finishing the promotion failed", self.name)

    @relay_api.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )
    async def relay(self, path: str, request: Request) -> Response:
        started = time.monotonic()
        try:
            body = await read_body(request, self.limit)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        arm = arm_for(_user_of(body), self.canary_percent) if CANARY in self.arms else PRIMARY
        answer = self.arms[arm].options(stream=True).forward.remote(_portable(request.scope), body)
        try:
            first = await answer.__anext__()
        except Exception as exc:  # noqa: BLE001 - refused or lost before answering
            return self._unanswered(arm, exc, started)
        return Relayed(first, answer, arm, lambda s, f: self._record(arm, s, started, f))

    def _unanswered(self, arm: str, exc: Exception, started: float) -> Response:
        """The answer to a request its arm did not take: 503 with Retry-After when the
        arm's queue is full (or it has no replica), 500 when its replica failed."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, (BackPressureError, DeploymentUnavailableError)):
            status, error = (
                503,
                ApiError(
                    503,
                    "The model is overloaded: every replica is busy and the queue is full. Retry "
                    "after `Retry-After` seconds.",
                    kind="server_error",
                    code="overloaded",
                    headers={"Retry-After": self.retry_after},
                ),
            )
        else:
            logger.warning("raygen: the %s arm failed a request: %s", arm, exc)
            status, error = 500, failure(500, str(exc))
        self._record(arm, status, started, False)
        response = JSONResponse(error.body(), status_code=status, headers=error.headers)
        response.headers[ARM_HEADER] = arm
        return response


# --- the application ------------------------------------------------------------------


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


ROUTER_MAX_ONGOING = 10_000  # the router only relays: the arms' own limits shed overload


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application builder named in Serve config files, whose `args` are a
    resolved deploy spec."""
    return application(DeploySpec.model_validate(args))


def application(spec: DeploySpec, promoting: bool = False) -> serve.Application:
    """The Serve application of a deploy spec: the router in front of one model deployment
    per arm, the primary and, during a canary rollout, the canary. `promoting`: the
    router's second step of a promotion (`Router._finish_promotion`)."""
    from ray.serve.config import BackpressureConfig

    replica = spec.replica
    update = {
        # A redeployment (another model or settings) starts the new replicas, which load the
        # model and pass the gate, before the old ones stop taking requests; those then
        # finish what they have (streams included) within `drain_s`.
        "max_surge_percent": spec.updates.surge_percent,
        "graceful_shutdown_timeout_s": drain_s(spec),
    }
    arms = {
        arm: model_deployment.options(
            name=arm,
            autoscaling_config=autoscaling_config(spec),
            max_ongoing_requests=replica.max_ongoing_requests,
            # Overload is shed at once: 503 with Retry-After past each arm's queue.
            max_queued_requests=replica.max_queued_requests,
            backpressure_config=BackpressureConfig(retry_after_s=replica.retry_after_s),
            ray_actor_options={"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus},
            **update,
        )
        # Serve restarts the replicas of a deployment whose version changed, and gives each
        # deployment of `serve.run` a new random version unless told. Versioned by what
        # they serve, an arm whose model and settings did not change keeps its replicas
        # when the application is deployed again (a canary added or decided).
        .options(version=_version_of(armed), _internal=True)
        .bind(armed.model_dump(mode="json"))
        for arm, armed in arm_specs(spec).items()
    }
    return Router.options(
        num_replicas=1,
        max_ongoing_requests=ROUTER_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        **update,
    ).bind(spec.model_dump(mode="json"), arms, promoting)


def _version_of(armed: DeploySpec) -> str:
    """A model deployment's version: its spec and its model's files."""
    from raygen.jobs.model_hash import model_sha256

    about = [armed.model_dump(mode="json"), model_sha256(armed.model)]
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:16]


def drain_s(spec: DeploySpec) -> float:
    """Seconds a replica being replaced or removed keeps working on the requests it has."""
    return spec.updates.drain_timeout_s or spec.http.request_timeout_s
