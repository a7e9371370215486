"""OpenAI's response shapes for completions and chat completions, whole or streamed, built
from what the engine delivers (`TextDelta`s, one per choice).

The output filter sees each choice's generated text (never an echoed prompt); a choice it
matched keeps no log-probabilities, whose tokens would show what it withheld.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from raygen.serving.runtimes.text import TextDelta, TokenLogprob

# (generated text, finish reason) -> (text to send, finish reason, whether the filter matched)
Check = Callable[[str, str | None], tuple[str, str | None, bool]]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TextAnswer:
    """One request's choices in the shape of OpenAI's completions API (`echo` and
    `logprobs` as it defines them); `ChatAnswer` for chat. Streamed, each chunk has what the
    engine's step added; with an output filter, each choice is sent whole once it ends."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(
        self,
        response_id: str,
        model: str,
        choices: int,
        check: Check,
        buffered: bool,
        logprobs: bool,
        echo: list[str] | None = None,
    ):
        self.response_id = response_id
        self.model = model
        self.check = check
        self.buffered = buffered  # the filter needs each choice whole
        self.logprobs = logprobs
        self.echo = echo  # each choice's prompt text, when echoed
        self.texts = [""] * choices  # generated so far (held while buffered)
        self.tokens: list[list[TokenLogprob]] = [[] for _ in range(choices)]  # held likewise
        self.offsets = [0] * choices  # characters of each choice its sent tokens cover
        self.started = [False] * choices

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": self.chunk_object if chunk else self.object,
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
        }

    def whole(self, deltas: list[TextDelta], prompt_tokens: int) -> dict[str, Any]:
        """The response to a request that was not streamed: every choice whole."""
        choices = []
        for i, delta in enumerate(deltas):
            text, reason, matched = self.check(delta.text, delta.finish_reason)
            tokens = None if matched else self._scored(i, delta)
            choices.append(self._choice(i, self._opening_text(i) + text, reason, tokens, False))
        body = self.envelope(choices, chunk=False)
        body["usage"] = usage(prompt_tokens, sum(d.tokens for d in deltas))
        return body

    def opening(self) -> list[dict[str, Any]]:
        """Choices to send before any token (chat's role)."""
        return []

    def step(self, deltas: list[TextDelta | None]) -> list[dict[str, Any]]:
        """The chunk choices of one engine step (none for choices with nothing to send)."""
        choices = []
        for i, delta in enumerate(deltas):
            if delta is None:
                continue
            tokens = self._scored(i, delta)
            text, reason = delta.text, delta.finish_reason
            if self.buffered:
                self.texts[i] += text
                self.tokens[i] += tokens or []
                if reason is None:
                    continue
                text, reason, matched = self.check(self.texts[i], reason)
                tokens = None if matched or not self.logprobs else self.tokens[i]
            opening = self._opening_text(i) if not self.started[i] else ""
            self.started[i] = True
            if opening or text or reason or tokens:
                choices.append(self._choice(i, opening + text, reason, tokens, True))
        return choices

    def _opening_text(self, i: int) -> str:
        return self.echo[i] if self.echo else ""

    def _scored(self, i: int, delta: TextDelta) -> list[TokenLogprob] | None:
        """The tokens of `delta` (after the prompt's, first, when echoed), if asked for."""
        if not self.logprobs:
            return None
        return (delta.prompt or []) + delta.logprobs

    def _choice(
        self,
        i: int,
        text: str,
        reason: str | None,
        tokens: list[TokenLogprob] | None,
        chunk: bool,
    ) -> dict[str, Any]:
        logprobs = None
        if tokens is not None:
            # Offsets follow the tokens, whose text can trail the text sent so far (a tail
            # held back while it could still become a stop sequence).
            logprobs = completion_logprobs(tokens, self.offsets[i])
            self.offsets[i] += sum(len(t.text) for t in tokens)
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}


class ChatAnswer(TextAnswer):
    """The same in the shape of OpenAI's chat completions API: a `message` per choice, or
    streamed `delta`s (the assistant's role first, then its content)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        return {**super().envelope(choices, chunk), "system_fingerprint": None}

    def opening(self) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(len(self.texts))
        ]

    def _choice(
        self,
        i: int,
        text: str,
        reason: str | None,
        tokens: list[TokenLogprob] | None,
        chunk: bool,
    ) -> dict[str, Any]:
        logprobs = None
        if tokens is not None:  # (the end of turn is not part of the answer's tokens)
            content = chat_logprobs([t for t in tokens if not t.ends])
            logprobs = {"content": content, "refusal": None}
        if chunk:
            delta = {"content": text} if text else {}
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's `logprobs`: parallel lists, offsets into the choice's text.
    Each position's `top_logprobs` holds the chosen token too, as OpenAI's does (up to
    `logprobs` + 1 entries)."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        # The prompt's first token has none: nothing predicts it.
        "top_logprobs": [None if t.logprob is None else _top(t) for t in tokens],
        "text_offset": offsets,
    }


def _top(token: TokenLogprob) -> dict[str, float]:
    top: dict[str, float] = {}
    for text, logprob in token.top:  # best first: tokens with the same text keep the best
        top.setdefault(text, logprob)
    top.setdefault(token.text, token.logprob)
    return top


def chat_logprobs(tokens: list[TokenLogprob]) -> list[dict[str, Any]]:
    """The chat API's `logprobs.content`: one entry per token, with its UTF-8 bytes."""
    return [
        {
            "token": t.text,
            "logprob": t.logprob,
            "bytes": list(t.text.encode()),
            "top_logprobs": [
                {"token": text, "logprob": logprob, "bytes": list(text.encode())}
                for text, logprob in t.top
            ],
        }
        for t in tokens
    ]
