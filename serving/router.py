"""The Serve application of a deploy spec, and its canary rollouts.

An application is one model deployment per arm (`serving/app.py`'s `ModelServer`, each
autoscaled on its own): the primary, which is the HTTP ingress, and during a canary
rollout the canary, beside the rollout's judge (`rollout`, one replica holding no model).
Without a canary nothing stands between Serve's proxy and the primary's replicas, which
answer every request themselves. During a rollout each primary replica picks the arm of
each request it receives (a request carrying `user` always lands on the same one),
answers the primary's share itself and relays the canary's to a canary replica, which
answers with the whole API (limits, errors, streams); the outcome of every answer goes to
the judge, which gathers each arm's figures across the replicas and decides.

A rollout's state lives with the application (the judge, and the primary's Serve
`user_config`, which reaches running replicas without restarting them), not with the
process that deployed it.
"""

from __future__ import annotations

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

from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from raygen.serving.api import ApiError, read_body
from raygen.serving.app import ARM_HEADER, ModelServer, answering, failure, model_deployment
from raygen.serving.relay import OUTCOME, outcome_noted
from raygen.serving.spec import CANARY, PRIMARY, DeploySpec, arm_specs, with_arm

logger = logging.getLogger("ray.serve")

ROLLOUT = "rollout"  # the judge's deployment
LATENCIES_KEPT = 10_000  # per arm: enough for a 99th percentile of the recent requests
REPORT_EVERY_S = 0.1  # a primary replica sends the judge its requests' outcomes this often
REPORT_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 1800  # a decided rollout's step (replicas loading a model) comes up within


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
    canary: Any, primary: ArmFigures, tried: ArmFigures, seconds: float, latency: bool = True
) -> tuple[str, str] | None:
    """The rollout's decision on its figures so far: (ROLLBACK or PROMOTE, why), or None to
    keep measuring. `canary` is the spec's CanarySpec; `tried` the canary's figures;
    `latency`: judge the p99s too (they sort every latency kept).

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
    if latency and budget is not None and enough:
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


# --- a primary replica: the application's HTTP ingress ---------------------------------


class Split:
    """A primary replica's part in a rollout: the canary's share of its requests, and the
    outcomes of those it answered or relayed, sent to the judge every REPORT_EVERY_S. The
    judge answers with the share as it is now, so a decision reaches every replica busy
    enough to matter within that time."""

    def __init__(self, app: str):
        # Nothing to the canary until the judge says how much: it may still be loading.
        self.canary_percent = 0.0
        self.canary = serve.get_deployment_handle(CANARY, app)
        self.judge = serve.get_deployment_handle(ROLLOUT, app)
        self.outcomes: list[tuple[str, int, float, bool]] = []
        # Asked at once (the rollout starting), then with each batch of outcomes.
        self.reporting: asyncio.Task | None = asyncio.get_running_loop().create_task(
            self._report(at_once=True)
        )

    def note(self, arm: str, status: int, seconds: float, filtered: bool) -> None:
        self.outcomes.append((arm, status, seconds, filtered))
        if self.reporting is None or self.reporting.done():
            self.reporting = asyncio.get_running_loop().create_task(self._report())

    async def _report(self, at_once: bool = False) -> None:
        while at_once or self.outcomes:
            if not at_once:
                await asyncio.sleep(REPORT_EVERY_S)
            at_once = False
            outcomes, self.outcomes = self.outcomes, []
            try:
                reply = self.judge.report.remote(outcomes)
                self.canary_percent = await asyncio.wait_for(reply, REPORT_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a judge being replaced
                logger.warning("raygen: %d outcomes missed the judge: %r", len(outcomes), exc)


class Relayed(Response):
    """The canary's answer, relayed as it comes (a stream chunk by chunk); reports how it
    went when it ends. `first` is the canary's first list of messages (the response's start
    and what came with it), `rest` the generator of the next ones."""

    def __init__(self, first: list[dict], rest: Any, done: Any):
        self.first, self.rest, self.done = first, rest, done
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        start, *pending = self.first
        status = start["status"]
        streamed = (b"content-type", b"text/event-stream") in {
            (k.lower(), v.split(b";")[0]) for k, v in start.get("headers", [])
        }
        await send(start)
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
                except StopAsyncIteration:  # after the body, the canary's OUTCOME
                    break
                except Exception as exc:  # noqa: BLE001 - the canary failed mid-answer
                    logger.warning("raygen: the canary failed mid-answer: %s", exc)
                    status, failed = 500, True
                    error = failure(500, str(exc))
                    # A stream says so in an event; a body cut short is its own sign.
                    tail = f"data: {json.dumps(error.body())}\n\n" if streamed else ""
                    pending = [{"type": "http.response.body", "body": tail.encode()}]
        finally:
            if not ended:
                self.rest.cancel()  # the client left: the canary stops working on it
            self.done(status, filtered)


class FrontDoor:
    """A primary replica's ASGI app: the model API (`serving/app.py`'s `answering`), and
    during a rollout the split of its requests between the arms."""

    def __init__(self, server: PrimaryServer):
        self.server = server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        split = self.server.split
        # What the arms are measured on is their answers: requests to generate (POST); the
        # rest (health, model list, schema) the primary answers.
        if split is None or scope["type"] != "http" or scope["method"] != "POST":
            await answering(scope, receive, send)
            return
        started = time.monotonic()
        try:
            body = await read_body(Request(scope, receive), self.server.spec.limits.max_body_bytes)
        except ApiError as exc:
            await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
            return
        if arm_for(_user_of(body), split.canary_percent) == CANARY:
            response = await self._relayed(split, scope, body, started)
            await response(scope, receive, send)
            return
        status = 500  # unless the API answers

        delivered = False

        async def receive_read() -> dict:
            nonlocal delivered
            if delivered:  # after the body: the client's own messages (a leaving)
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_noting(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with outcome_noted() as outcome:
            try:
                await answering(scope, receive_read, send_noting)
            finally:
                split.note(PRIMARY, status, time.monotonic() - started, outcome["filtered"])

    async def _relayed(self, split: Split, scope: dict, body: bytes, started: float) -> Response:
        """The canary's answer to a request, as a response to send."""

        def done(status: int, filtered: bool) -> None:
            split.note(CANARY, status, time.monotonic() - started, filtered)

        answer = split.canary.options(stream=True).forward.remote(_portable(scope), body)
        try:
            first = await answer.__anext__()
        except Exception as exc:  # noqa: BLE001 - refused or lost before answering
            response = self._unanswered(exc)
            done(response.status_code, False)
            return response
        return Relayed(first, answer, done)

    def _unanswered(self, exc: Exception) -> Response:
        """The answer to a request the canary did not take: 503 with Retry-After when its
        queue is full (or it has no replica), 500 when its replica failed."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, (BackPressureError, DeploymentUnavailableError)):
            replica = self.server.spec.replica
            error = ApiError(
                503,
                "The model is overloaded: every replica is busy and the queue is full. Retry "
                "after `Retry-After` seconds.",
                kind="server_error",
                code="overloaded",
                headers={"Retry-After": str(math.ceil(replica.retry_after_s))},
            )
        else:
            logger.warning("raygen: the canary failed a request: %s", exc)
            error = failure(500, str(exc))
        response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        response.headers[ARM_HEADER] = CANARY
        return response


@serve.ingress()
class PrimaryServer(ModelServer):
    """A replica of the primary arm: the model and its API as the application's HTTP
    ingress (`FrontDoor`), which during a rollout also splits the traffic (`Split`).

    `beside` are the application's other deployments (the canary and the judge), bound to
    it so that Serve deploys them with the application. A replica finds them by name: a
    running replica whose model and settings did not change is not restarted when they come
    or go, and learns of them through `reconfigure`.
    """

    def __init__(self, spec: dict[str, Any], *beside: Any):
        super().__init__(spec)
        self.application = serve.get_replica_context().app_name
        self.app_spec = spec
        self.split: Split | None = None

    def __serve_build_asgi_app__(self) -> FrontDoor:
        return FrontDoor(self)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """The application's spec and rollout (`application`'s `user_config`): Serve calls
        this when the replica starts and whenever they change."""
        self.app_spec = config["spec"]
        if not config["rollout"]:
            self.split = None
        elif self.split is None:
            self.split = Split(self.application)

    async def about(self) -> dict[str, Any]:
        """What the application serves: its spec and, per arm, the model's hash and, during
        a rollout, figures (`raygen serve` updates and `raygen serve status` read it)."""
        arms = {PRIMARY: ModelServer.about(self)}
        about: dict[str, Any] = {"spec": self.app_spec, **arms[PRIMARY], "arms": arms}
        if self.split is not None:
            judged, canary = await asyncio.gather(
                self.split.judge.about.remote(), self.split.canary.about.remote()
            )
            arms[CANARY] = canary
            for arm, figures in judged.pop("arms").items():
                arms[arm].update(figures)
            about.update(judged)
        return about


# --- the judge ----------------------------------------------------------------------------


def _deployment_healthy(app: str, deployment: str) -> bool:
    status = serve.status().applications.get(app)
    found = status.deployments.get(deployment) if status else None
    return found is not None and str(getattr(found.status, "value", found.status)) == "HEALTHY"


def _app_status(name: str) -> str:
    app = serve.status().applications.get(name)
    return str(getattr(app.status, "value", app.status)) if app else "NOT_STARTED"


def _redeploy(name: str, spec: DeploySpec, settled: float | None = None,
              decision: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Deploy `spec` as application `name` from inside it, without waiting (the caller is
    one of the replicas the new version replaces)."""
    target = serve.RunTarget(
        application(spec, settled, decision), name=name, route_prefix=spec.route_prefix
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


# Defined before the judge: Serve pickles the class when it is decorated, with the module
# globals its methods use as they are at that moment.


@serve.deployment(name=ROLLOUT)
class Rollout:
    """The rollout's judge: each arm's figures, gathered from the primary's replicas, and
    the decision on them. One replica per application with a canary, holding no model.

    `settled`: the canary's share once the rollout is decided, while the application is
    brought to its end state in steps (`_settle`); None while measuring.
    """

    def __init__(self, spec: dict[str, Any], settled: float | None = None,
                 decision: dict[str, Any] | None = None):  # fmt: skip
        self.spec = DeploySpec.model_validate(spec)
        assert self.spec.canary is not None
        self.name = serve.get_replica_context().app_name
        self.started = time.time()
        self.figures = {PRIMARY: ArmFigures(), CANARY: ArmFigures()}
        self.decision = decision
        self.measuring = settled is None
        self.ready = settled is not None  # a decided rollout's canary already runs
        self.next_check = 0.0
        self.canary_percent = self.spec.canary.traffic_percent if settled is None else settled
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
        if settled is not None:
            threading.Thread(target=self._settle, args=(settled,), daemon=True).start()

    async def report(self, outcomes: list[tuple[str, int, float, bool]]) -> float:
        """A primary replica's outcomes since its last report; returns the canary's share
        now: 0 until the canary's replicas run (they load the model and pass the gate
        first), then the spec's, until a decision changes it."""
        if not self.ready and time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + 1.0
            if await asyncio.to_thread(_deployment_healthy, self.name, CANARY):
                # Measured from here: both arms over the same time, the canary answering.
                self.ready, self.started = True, time.time()
                self.figures = {PRIMARY: ArmFigures(), CANARY: ArmFigures()}
                logger.info("raygen: %s: the canary runs; %g%% of requests go to it",
                            self.name, self.canary_percent)  # fmt: skip
        if not self.ready:
            return 0.0
        for i, (arm, status, seconds, filtered) in enumerate(outcomes):
            # p99s sort every latency kept: judged once per report, rates at every outcome.
            self._record(arm, status, seconds, filtered, latency=i == len(outcomes) - 1)
        return self.canary_percent

    async def about(self) -> dict[str, Any]:
        return {
            "arms": {arm: figures.summary() for arm, figures in self.figures.items()},
            "canary_percent": self.canary_percent if self.ready else 0.0,
            "measuring": self.measuring,
            "decision": self.decision,
            "since": self.started,
        }

    def _record(
        self, arm: str, status: int, seconds: float, filtered: bool, latency: bool = True
    ) -> None:
        self.figures[arm].add(status, seconds, filtered)
        outcome = "error" if status >= 500 else "client_error" if status >= 400 else "ok"
        self.requests.inc(tags={"arm": arm, "outcome": outcome})
        self.latency.observe(1000 * seconds, tags={"arm": arm})
        if filtered:
            self.filtered.inc(tags={"arm": arm})
        if self.measuring and (arm == CANARY or latency):
            assert self.spec.canary is not None
            since = time.time() - self.started
            primary, tried = self.figures[PRIMARY], self.figures[CANARY]
            verdict = judge(self.spec.canary, primary, tried, since, latency)
            if verdict is not None:
                self._decide(*verdict, by="raygen")

    async def decide(self, action: str, by: str) -> dict[str, Any]:
        """`raygen serve promote|rollback NAME`: decide the rollout by hand. Returns the
        decision, or {"error": why} when there is no rollout to decide."""
        if not self.measuring:
            assert self.decision is not None
            return {
                "error": f"{self.name} has no canary rollout to decide (decided: "
                f"{self.decision['action']}); deploy a spec with `canary` to start one."
            }
        verb = "promoted" if action == PROMOTE else "rolled back"
        return self._decide(action, f"{verb} by hand", by=by)

    def _decide(self, action: str, reason: str, by: str) -> dict[str, Any]:
        """Act on a decision at once (all traffic to the model kept: the primary's replicas
        learn it from their next report), record it with the figures behind it, and bring
        the application to its end state."""
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
        """Record the decision, then redeploy towards it. Recorded first: the redeployment
        replaces this replica, which would cut a record still being written short. Traffic
        does not wait for either (the share changed when the decision was taken), and a
        record that cannot be written does not stop the redeployment."""
        try:
            _record_decision(self.spec, self.name, decision)
        except Exception:  # noqa: BLE001 - nothing to answer to: the log says what failed
            logger.exception("raygen: %s: recording the canary decision failed", self.name)
        try:
            if decision["action"] == ROLLBACK:
                _redeploy(self.name, self.spec, settled=0.0, decision=decision)
            else:  # the primary deployment takes the canary's model first
                promoted = with_arm(self.spec, PRIMARY, arm_specs(self.spec)[CANARY])
                _redeploy(self.name, promoted, settled=100.0, decision=decision)
        except Exception:  # noqa: BLE001
            logger.exception("raygen: %s: enacting the canary decision failed", self.name)

    def _settle(self, share: float) -> None:
        """The steps after a decision, each once the whole application runs the previous:
        a promotion's primary deployment runs the canary's model (share 100: the canary
        answers meanwhile), then the primary answers everything (share 0), then the canary
        goes. A step waits for the last so no replica relays to a canary that is gone."""
        try:
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while (status := _app_status(self.name)) != "RUNNING":
                if status in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
                    logger.error(
                        "raygen: %s: the canary decision's step did not come up (%s); the "
                        "application stays as it is: see `raygen serve status`",
                        self.name, status,
                    )  # fmt: skip
                    return
                time.sleep(1)
            if share > 0:
                _redeploy(self.name, self.spec, settled=0.0, decision=self.decision)
            else:
                _redeploy(self.name, self.spec.model_copy(update={"canary": None}))
        except Exception:  # noqa: BLE001
            logger.exception("raygen: %s: settling the canary decision failed", self.name)


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


JUDGE_MAX_ONGOING = 1_000  # reports from the primary's replicas, a few per second each
primary_deployment = serve.deployment(PrimaryServer, name=PRIMARY)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application builder named in Serve config files, whose `args` are a
    resolved deploy spec."""
    return application(DeploySpec.model_validate(args))


def application(
    spec: DeploySpec, settled: float | None = None, decision: dict[str, Any] | None = None
) -> serve.Application:
    """The Serve application of a deploy spec: the primary deployment (the HTTP ingress)
    and, during a canary rollout, the canary's deployment and the judge. `settled` and
    `decision`: a decided rollout's steps to its end (`Rollout._settle`)."""
    from ray.serve.config import BackpressureConfig

    replica = spec.replica
    update = {
        # A redeployment (another model or settings) starts the new replicas, which load the
        # model and pass the gate, before the old ones stop taking requests; those then
        # finish what they have (streams included) within `drain_s`.
        "max_surge_percent": spec.updates.surge_percent,
        "graceful_shutdown_timeout_s": drain_s(spec),
    }

    def arm(deployment: Any, name: str, armed: DeploySpec) -> Any:
        return (
            deployment.options(
                name=name,
                autoscaling_config=autoscaling_config(spec),
                max_ongoing_requests=replica.max_ongoing_requests,
                # Overload is shed at once: 503 with Retry-After past each arm's queue.
                max_queued_requests=replica.max_queued_requests,
                backpressure_config=BackpressureConfig(retry_after_s=replica.retry_after_s),
                ray_actor_options=actor_options(replica),
                **update,
            )
            # Serve restarts the replicas of a deployment whose version changed, and gives
            # each deployment of `serve.run` a new random version unless told. Versioned by
            # what they serve, an arm whose model and settings did not change keeps its
            # replicas when the application is deployed again (a canary added or decided).
            .options(version=_version_of(armed, model=armed.model), _internal=True)
        )

    arms = arm_specs(spec)
    beside = []
    if CANARY in arms:
        canary = arm(model_deployment, CANARY, arms[CANARY])
        judging = Rollout.options(
            num_replicas=1,
            max_ongoing_requests=JUDGE_MAX_ONGOING,
            ray_actor_options={"num_cpus": 0},
        ).options(version=_version_of(spec, settled, decision), _internal=True)
        beside = [
            canary.bind(arms[CANARY].model_dump(mode="json")),
            judging.bind(spec.model_dump(mode="json"), settled, decision),
        ]
    # Running primary replicas learn of a canary from here (no restart); its share they
    # learn from the judge.
    rollout = {"spec": spec.model_dump(mode="json"), "rollout": spec.canary is not None}
    primary = arm(primary_deployment, PRIMARY, arms[PRIMARY]).options(user_config=rollout)
    return primary.bind(arms[PRIMARY].model_dump(mode="json"), *beside)


def actor_options(replica: Any) -> dict[str, Any]:
    """A model replica's Ray actor options: its CPUs, GPUs and GPU model (ReplicaSpec)."""
    options: dict[str, Any] = {"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus}
    if replica.accelerator_type:
        options["accelerator_type"] = replica.accelerator_type
    return options


def _version_of(*what: Any, model: str | None = None) -> str:
    """A deployment's version: what it was given (deploy specs as JSON) and, for a model
    deployment, its model's files."""
    from raygen.jobs.model_hash import model_sha256

    about = [x.model_dump(mode="json") if isinstance(x, DeploySpec) else x for x in what]
    if model is not None:
        about.append(model_sha256(model))
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:16]


def drain_s(spec: DeploySpec) -> float:
    """Seconds a replica being replaced or removed keeps working on the requests it has."""
    return spec.updates.drain_timeout_s or spec.http.request_timeout_s
