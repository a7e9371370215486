"""Batching on a replica: one thread runs the model; requests that arrive while it is busy
form the next batch, or, for language models, join the running one at the next token.

Pure Python threads around the runtimes of `serving/runtimes/` (no Ray, no asyncio): a
caller submits its work with a `deliver` callback, which the engine thread calls with
what the work produced (the Serve app hands it to its event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raygen.serving.runtimes.common import InputError
from raygen.serving.runtimes.text import DecodeBatch, LanguageModel, TextDelta, TextRequest

logger = logging.getLogger(__name__)


@dataclass
class Update:
    """What one request got: from one step (streamed), or its whole completions."""

    deltas: list[TextDelta | None]  # one per completion; None: nothing new this step
    batch_size: int  # completions decoded together (at the end: the most while it ran)
    done: bool
    error: str | None = None  # generation failed; the request gets nothing more
    status: int = 500  # with `error`: 400 when the request's own input caused it

    def then(self, later: Update) -> Update:
        """This update followed by `later` (without an error), as one."""
        assert later.error is None, "an update with an error is answered, not merged"
        return Update(
            joined(self.deltas, later.deltas), max(self.batch_size, later.batch_size), later.done
        )


def joined(deltas: list[TextDelta | None], later: list[TextDelta | None]) -> list[Any]:
    """Each completion's `deltas` followed by its `later` delta (None: nothing new)."""
    return [
        b if a is None else a if b is None else a.then(b)
        for a, b in zip(deltas, later, strict=True)
    ]


def error_status(exc: BaseException) -> int:
    """The HTTP status of a generation failure: 400 for the request's input, else 500."""
    return 400 if isinstance(exc, InputError) else 500


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Ticket:
    """One request's work in an engine: what it asked for and where results go."""

    def __init__(self, work: Any, size: int, deliver: Callable[[Any], None], stream: bool):
        self.work = work
        self.size = size  # rows (completions, images) it adds to a batch
        self.deliver = deliver
        self.stream = stream
        self.cancelled = False
        self.done = False  # all delivered
        self.rows: list[Any] = []  # its rows in the running batch
        self.so_far: list[Any] = [None] * size  # what each row produced, not yet delivered
        self.most = 0  # the largest batch it ran in


class _Engine:
    """The thread and its queue of tickets; a subclass's `_run` loops on `_admit`."""

    def __init__(
        self,
        name: str,
        max_batch_size: int,
        wait_s: float,
        on_step: Callable[[int], None] | None,
    ):
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.on_step = on_step  # called with the batch size of every step
        self._pending: deque[Ticket] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self.running = 0  # rows (completions, images) the model is working on
        self._progress_at = time.monotonic()  # last step done, or work arriving at an idle engine
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _submit(self, ticket: Ticket) -> Ticket:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if not self._pending and not self.running:
                self._progress_at = time.monotonic()  # idle until now is not a stall
            self._pending.append(ticket)
            self._lock.notify()
        return ticket

    def alive(self) -> bool:
        """Whether the engine thread runs (it ends only when closed, or by a bug)."""
        return self._thread.is_alive()

    def queued(self) -> int:
        """Requests waiting for the model."""
        return len(self._pending)

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing a step (0 when idle)."""
        if not self._pending and not self.running:
            return 0.0
        return time.monotonic() - self._progress_at

    def _progressed(self, running: int) -> None:
        self.running = running
        self._progress_at = time.monotonic()

    def cancel(self, ticket: Ticket) -> None:
        """Stop working for `ticket` (its client went away); nothing more is delivered."""
        ticket.cancelled = True

    def close(self) -> None:
        """Finish what is running, refuse new work and stop the thread."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _admit(self, busy: int, can_join: bool) -> list[Ticket] | None:
        """Pending tickets that fit next to `busy` running rows, FIFO; waits while idle.
        None once closed and idle."""
        with self._lock:
            if not busy:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return None
                # Idle: give requests sent together a moment to start together.
                deadline = time.monotonic() + self.wait_s
                while sum(t.size for t in self._pending) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closed:
                        break
                    self._lock.wait(left)
            room = self.max_batch_size - busy if can_join else 0
            admitted: list[Ticket] = []
            while self._pending:
                ticket = self._pending[0]
                if ticket.cancelled:
                    self._pending.popleft()
                    continue
                # FIFO: a request bigger than the room waits (alone if bigger than a batch).
                if ticket.size > room and (admitted or busy):
                    break
                admitted.append(self._pending.popleft())
                room -= ticket.size
            return admitted

    def _observe(self, batch_size: int) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(batch_size)
        except Exception:  # a metric must not stop the engine
            logger.warning("raygen: could not record the batch size", exc_info=True)

    def _send(self, ticket: Ticket, update: Any) -> None:
        try:
            ticket.deliver(update)
        except Exception:  # the receiver is gone (e.g. its event loop closed)
            logger.warning("raygen: could not deliver a result; dropping the request")
            ticket.cancelled = True

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        """Answer `ticket` with `exc` (once) and stop working for it."""
        if ticket.done or ticket.cancelled:
            return
        ticket.done = ticket.cancelled = True
        if error_status(exc) >= 500:
            logger.error("raygen: generation failed: %s", describe(exc), exc_info=exc)
        self._send(ticket, self._failure(exc))

    def _failure(self, exc: BaseException) -> Any:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError


class TextEngine(_Engine):
    """Continuous batching of completions: every running completion gets a token per
    step, and requests that arrive meanwhile join at the next step (up to
    `max_batch_size` completions decoded together)."""

    def __init__(
        self,
        model: LanguageModel,
        max_batch_size: int,
        wait_s: float = 0.0,
        on_step: Callable[[int], None] | None = None,
    ):
        self.model = model
        super().__init__("raygen-text-engine", max_batch_size, wait_s, on_step)

    def submit(
        self, requests: list[TextRequest], deliver: Callable[[Update], None], stream: bool
    ) -> Ticket:
        """Generate `requests` (one request's completions). `deliver` is called on the
        engine's thread: streamed, with every step's `Update`; else once, at the end."""
        return self._submit(Ticket(requests, len(requests), deliver, stream))

    def _failure(self, exc: BaseException) -> Update:
        return Update([], 0, True, describe(exc), error_status(exc))

    def _run(self) -> None:
        batch = DecodeBatch(self.model)
        while True:
            admitted = self._admit(len(batch.rows), batch.can_join())
            if admitted is None:
                return
            try:
                for ticket in admitted:
                    try:
                        ticket.rows = batch.add(ticket.work, owner=ticket)
                    except Exception as exc:  # this request's input: it alone fails
                        self._fail(ticket, exc)
                for row in batch.rows:
                    if row.owner.cancelled:
                        row.finished = True
                self.running = len(batch.rows) + len(batch.joining)
                step = batch.step()
                self._progressed(len(batch.rows))
                self._observe(len(step))
                updates = self._updates(step, len(step))
                batch.drop(lambda row: row.finished)
                self.running = len(batch.rows)
                for ticket, update in updates:  # once the engine's state shows them done
                    ticket.done = update.done
                    self._send(ticket, update)
            except Exception as exc:  # e.g. out of memory: fail these requests, go on
                for ticket in {row.owner for row in batch.rows + batch.joining} | set(admitted):
                    self._fail(ticket, exc)
                batch = DecodeBatch(self.model)
                self._progressed(0)

    def _updates(self, step: dict[Any, TextDelta | None], size: int) -> list[tuple[Ticket, Update]]:
        """What to hand each request: what this step added (streamed) or, once all its
        completions have finished, all of them. (Requests one of whose rows failed are
        answered at once.)"""
        updates = []
        for ticket in {row.owner: None for row in step}:  # in batch order
            if ticket.cancelled or ticket.done:  # (rows that cannot leave stay till the end)
                continue
            failed = next((row.error for row in ticket.rows if row.error is not None), None)
            if failed is not None:  # one of its rows failed alone: so does the request
                for row in ticket.rows:
                    row.finished = True
                self._fail(ticket, failed)
                continue
            ticket.most = max(ticket.most, size)
            done = all(row.finished for row in ticket.rows)  # (marked once it is sent)
            deltas = [step.get(row) for row in ticket.rows]
            if ticket.stream:
                updates.append((ticket, Update(deltas, size, done)))
                continue
            ticket.so_far = joined(ticket.so_far, deltas)
            if done:
                updates.append((ticket, Update(ticket.so_far, ticket.most, True)))
        return updates


class ImageEngine(_Engine):
    """Batches of image requests: the requests waiting when the model is free are
    denoised together (up to `max_batch_size` images)."""

    def __init__(
        self,
        generate: Callable[[list[Any]], list[Any]],
        max_batch_size: int,
        wait_s: float = 0.0,
        on_step: Callable[[int], None] | None = None,
    ):
        self.generate = generate  # jobs -> one result per job
        super().__init__("raygen-image-engine", max_batch_size, wait_s, on_step)

    def submit(self, job: Any, images: int, deliver: Callable[[Any], None]) -> Ticket:
        """Generate `job` (of `images` images); `deliver` is called on the engine's thread
        with (its result, images in the batch), or the exception that failed the batch."""
        return self._submit(Ticket(job, images, deliver, stream=False))

    def _failure(self, exc: BaseException) -> BaseException:
        return exc

    def _run(self) -> None:
        while True:
            admitted = self._admit(0, True)
            if admitted is None:
                return
            if not admitted:
                continue
            images = sum(ticket.size for ticket in admitted)
            self.running = images
            try:
                results = self.generate([ticket.work for ticket in admitted])
                sizes = [images] * len(admitted)
            except Exception as exc:
                if len(admitted) == 1:
                    results, sizes = [exc], [images]
                else:  # find whose request fails: each alone, so the others are answered
                    results = [self._alone(ticket) for ticket in admitted]
                    sizes = [ticket.size for ticket in admitted]
            self._progressed(0)
            self._observe(images)
            for ticket, result, size in zip(admitted, results, sizes, strict=True):
                if isinstance(result, BaseException):
                    self._fail(ticket, result)
                elif not ticket.cancelled:
                    self._send(ticket, (result, size))

    def _alone(self, ticket: Ticket) -> Any:
        try:
            (result,) = self.generate([ticket.work])
            return result
        except Exception as exc:
            return exc
