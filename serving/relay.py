"""Answering a request relayed from a primary replica on a canary replica, in-process: the
request's ASGI messages in, the response's out (`ModelServer.forward`); and what answering
a request noted (`note_filtered`), which the rollout's figures count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

OUTCOME = "raygen.outcome"  # an arm's last message: how the answer went, not relayed

# What answering one relayed request noted on the arm's replica (`relay_messages`).
_outcome: ContextVar[dict[str, Any] | None] = ContextVar("raygen_outcome", default=None)


def note_filtered() -> None:
    """The answer being given matched the output filter."""
    outcome = _outcome.get()
    if outcome is not None:
        outcome["filtered"] = True


@contextmanager
def outcome_noted() -> Iterator[dict[str, Any]]:
    """What answering a request in this context notes: {"filtered": ...}."""
    outcome = {"filtered": False}
    token = _outcome.set(outcome)
    try:
        yield outcome
    finally:
        _outcome.reset(token)


async def relay_messages(app: Any, scope: dict[str, Any], body: bytes) -> AsyncIterator[list[dict]]:
    """Run one relayed request through an ASGI `app` in this process: yields the response's
    ASGI messages, the last followed by {"type": OUTCOME, "filtered": ...} (what the app
    noted answering). Messages are yielded in lists, as many as are ready: each yield is a
    trip back to the primary replica relaying, and a whole (not streamed) answer makes one."""
    messages: asyncio.Queue = asyncio.Queue()
    outcome = {"filtered": False}
    _outcome.set(outcome)  # seen by the request's task, which copies this context
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a client leaving arrives as this call's cancellation
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.put_nowait(message)

    def is_last(message: dict) -> bool:
        return message["type"] == "http.response.body" and not message.get("more_body")

    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        ended = False
        while not ended:
            getter = asyncio.ensure_future(messages.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                ready = [getter.result()]
            else:
                getter.cancel()
                task.result()  # the app's own failure, if it failed
                ready, ended = [], True
            while not messages.empty():
                ready.append(messages.get_nowait())
            ended = ended or any(is_last(m) for m in ready)
            if ended:
                ready.append({"type": OUTCOME, **outcome})
            yield ready
    finally:
        task.cancel()
