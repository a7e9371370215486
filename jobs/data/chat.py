"""Conversations for chat fine-tuning: read and checked (`conversation`), rendered with the
tokenizer's chat template, tokenized with the assistant's tokens marked (`ChatTokenizer`),
one conversation per sequence (right-padded: no conversation attends to another)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np

ROLES = ("system", "user", "assistant")
# The built-in template: ChatML, as most open chat models write it. Its two tokens are
# added to a tokenizer that lacks them.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")}
INVALID = "removed_invalid_conversation"


def conversation(row: dict[str, Any]) -> list[dict[str, str]] | str:
    """The conversation of a row (`messages`, or `prompt` + `response`), as a list of
    {role, content}; or why it cannot be used (a sentence)."""
    if "prompt" in row:
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            return "a prompt and a non-empty response (strings) are needed"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    messages = row.get("messages")
    if isinstance(messages, str):  # JSON text, as some data sets store it
        try:
            messages = json.loads(messages)
        except ValueError:
            return "messages is a string but not JSON"
    if not isinstance(messages, list | tuple) or not messages:
        return "messages is not a non-empty list"
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            return "a message is not a {role, content} object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"role {role!r} is not one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return "a message's content is not a string"
        turns.append({"role": role, "content": content})
    answered = [i for i, t in enumerate(turns) if t["role"] == "assistant" and t["content"]]
    if not answered:
        return "no assistant turn with content"
    if turns[0]["role"] == "assistant":
        return "it starts with the assistant (nothing to answer)"
    return turns


def encode(turns: list[dict[str, str]]) -> str:
    """One conversation as canonical JSON: the text the data pipeline filters, hashes and
    splits by."""
    return json.dumps(turns, ensure_ascii=False, separators=(",", ":"))


def decode(text: str) -> list[dict[str, str]]:
    return json.loads(text)


def contents(text: str) -> str:
    """What an encoded conversation says, without roles: for the text filters and the BPE."""
    return said(decode(text))


def said(turns: list[dict[str, str]]) -> str:
    return "\n".join(t["content"] for t in turns)


def apply_template(tokenizer: Any, template: str | None) -> None:
    """Give `tokenizer` the spec's `tokenizer.chat_template` (a built-in name or Jinja),
    adding a built-in's special tokens. Raises ValueError when it ends up with none."""
    if template in BUILTIN_TEMPLATES:
        text, tokens, _ = BUILTIN_TEMPLATES[template]
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
        tokenizer.chat_template = text
    elif template is not None:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise ValueError(
            "the tokenizer has no chat template; set tokenizer.chat_template: chatml (the "
            "built-in) or a Jinja template"
        )


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Tokens that end an assistant turn: EOS, and a built-in template's end-of-turn token
    when the tokenizer has it (generation stops at either)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for _, _, end in BUILTIN_TEMPLATES.values():
        token = tokenizer.convert_tokens_to_ids(end)
        if end in tokenizer.get_vocab() and token not in ids:
            ids.append(token)
    return ids


def set_generation_ends(model: Any, tokenizer: Any) -> None:
    """Where a model's generation ends (its generation config, exported with it): at EOS,
    or a chat template's end of turn; padding with EOS."""
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    if tokenizer.chat_template:
        model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)


class Sequence(NamedTuple):
    input_ids: np.ndarray  # (seq_len,) int32, right-padded
    targets: np.ndarray  # (seq_len,) uint8: 1 where the loss counts the token
    tokens: int  # before padding
    truncated: bool  # the conversation was longer than seq_len


class TemplateError(ValueError):
    """The chat template does not render a conversation's beginning as a prefix of it."""


class ChatTokenizer:
    """Renders conversations with the chat template and marks the tokens the loss counts:
    each assistant turn's tokens, up to and including the template's end of turn."""

    def __init__(self, tokenizer: Any, seq_len: int, loss_on: str):
        self.tokenizer, self.seq_len, self.loss_on = tokenizer, seq_len, loss_on
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else tokenizer.eos_token_id

    def render(self, turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    def assistant_spans(self, turns: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant's turns: what
        rendering up to a turn adds to the prompt for it."""
        text = self.render(turns)
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self.render(turns[:i], generation_prompt=True)
            upto = self.render(turns[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise TemplateError(
                    "the chat template renders the start of a conversation differently from "
                    "the whole (so the assistant's tokens cannot be found); use a template "
                    "that renders each turn in order, e.g. tokenizer.chat_template: chatml"
                )
            spans.append((len(before), len(upto)))
        return text, spans

    def __call__(self, turns: list[dict[str, str]]) -> Sequence:
        """The conversation as one right-padded sequence of `seq_len` tokens."""
        text, spans = self.assistant_spans(turns)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        if self.loss_on == "all":
            targets = np.ones(len(ids), dtype=np.uint8)
        else:
            starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
            targets = np.zeros(len(ids), dtype=np.uint8)
            for low, high in spans:
                targets[(starts >= low) & (starts < high)] = 1
        truncated = len(ids) > self.seq_len
        ids, targets = ids[: self.seq_len], targets[: self.seq_len]
        padding = self.seq_len - len(ids)
        return Sequence(
            np.concatenate([ids, np.full(padding, self.pad, np.int32)]),
            np.concatenate([targets, np.zeros(padding, np.uint8)]),
            len(ids),
            truncated,
        )
