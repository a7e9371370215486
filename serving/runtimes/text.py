"""Language-model inference: requests, their sampled tokens, and the decoding batch that
continuous batching steps one token at a time (rows join and leave between steps)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from raygen.serving.runtimes.common import InputError, torch_dtype

logger = logging.getLogger(__name__)


@dataclass
class TextRequest:
    """One completion to generate: a tokenized prompt and how to sample its continuation."""

    prompt_ids: list[int]
    max_tokens: int  # 0: only the prompt is run (to score it)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # in [0, 2**63): `jobs.seeding.derive_seed` of the user's seed
    logprobs: int | None = None  # each token's log-probability and this many alternatives
    echo_logprobs: bool = False  # with `logprobs`: the prompt's tokens' too


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (its raw distribution, whatever the
    sampling settings) and the most likely tokens at its position."""

    text: str  # its share of the text: a character split across tokens goes to the last
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: list[tuple[str, float]] = field(default_factory=list)  # best first
    ends: bool = False  # the end-of-text (or end-of-turn) token that stopped a completion


@dataclass
class TextDelta:
    """What one step added to one completion: new text, and why it ended (if it did)."""

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    tokens: int = 0  # completion tokens so far
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens of `text`
    prompt: list[TokenLogprob] | None = None  # the prompt scored, in the first delta

    def then(self, later: TextDelta) -> TextDelta:
        """This delta followed by `later`, as one."""
        return TextDelta(
            self.text + later.text,
            later.finish_reason,
            later.tokens,
            self.logprobs + later.logprobs,
            self.prompt if self.prompt is not None else later.prompt,
        )


class LanguageModel:
    """A causal language model and its tokenizer, generating batches of completions."""

    def __init__(self, local_dir: str, precision: str = "fp32", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(local_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            local_dir, use_safetensors=True, dtype=torch_dtype(precision)
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        config = self.model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or config.n_positions
        )
        self.eos_token_id = self.tokenizer.eos_token_id
        # Generation ends at EOS, or at any end the model's generation config names (a chat
        # template's end of turn).
        ends = self.model.generation_config.eos_token_id
        ends = ends if isinstance(ends, list) else [] if ends is None else [ends]
        self.stop_token_ids = frozenset(
            [*ends, *([self.eos_token_id] if self.eos_token_id is not None else [])]
        )
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id if self.eos_token_id is not None else 0
        self.bos_token_id = self.tokenizer.bos_token_id
        if self.bos_token_id is None:
            self.bos_token_id = self.pad_token_id
        # Ids a request may send: rows of the embedding that the tokenizer has tokens for
        # (a model may pad its embedding past its vocabulary).
        self.vocab_size = min(
            int(self.model.get_input_embeddings().num_embeddings), len(self.tokenizer)
        )

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def user_turn(self, prompt: str) -> str:
        """`prompt` as a user asks a chat model: their turn, rendered with the template."""
        return self.chat_prompt([{"role": "user", "content": prompt}])

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation rendered with the model's chat template, up to the assistant's
        turn (what training rendered before each answer)."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def generate(self, requests: list[TextRequest]) -> Iterator[list[TextDelta | None]]:
        """Generate all `requests` as one batch, a token per step.

        Yields, after every step, one entry per request: the text it added (held back
        while it could still turn into a stop sequence, or is an incomplete character),
        or None once that request has finished.
        """
        batch = DecodeBatch(self)
        rows = batch.add(requests)
        while batch.rows or batch.joining:
            step = batch.step()
            for row in rows:
                if row.error is not None:
                    raise row.error
            yield [step.get(row) for row in rows]
            batch.drop(lambda row: row.finished)

    def forward(self, input_ids, mask, positions, cache):
        """Next-token logits (B, vocab) on the CPU, and the KV cache holding `input_ids`.

        Args: input_ids, positions (B, T); mask (B, cached + T): 1 where a token is real.
        """
        import torch

        # Per call: grad mode is per thread, and servers decode on a thread of their own.
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float().cpu(), out.cache

    def mean_token_losses(self, texts: list[str], max_tokens: int) -> list[float]:
        """Each text's mean next-token loss (nats), on at most its first `max_tokens`
        tokens (and the context); texts of under 2 tokens get NaN."""
        import torch
        import torch.nn.functional as F

        limit = min(max_tokens, self.context_length)
        losses = []
        with torch.inference_mode():
            for text in texts:
                ids = self.encode(str(text))[:limit]
                if len(ids) < 2:
                    losses.append(float("nan"))
                    continue
                tokens = torch.tensor([ids], device=self.device)
                logits = self.model(input_ids=tokens).logits.float()  # (1, T, vocab)
                loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:])
                losses.append(float(loss))
        return losses

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def token_text(self, ids: list[int], k: int) -> str:
        """Token k's share of `decode(ids)`: the characters it completes. Decoded in a
        window of the tokens before it, so the cost does not grow with the text."""
        start = max(0, k - _TOKEN_WINDOW)
        before = self.decode(ids[start:k]).rstrip("\ufffd")
        after = self.decode(ids[start : k + 1]).rstrip("\ufffd")
        return after[len(before) :] if after.startswith(before) else after

    def scored(self, logits, context: list[int], token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability under (vocab,) `logits`, the logits after `context`,
        with the `top` most likely tokens there (texts as they would read after `context`);
        its own text is left for the caller."""
        logprobs = logits.float().log_softmax(-1)
        return TokenLogprob("", float(logprobs[token]), self._top(logprobs, context, top))

    def prompt_logprobs(self, ids: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability (and the `top` most likely tokens at its
        position), from a forward pass of the prompt alone: only (T, top + 1) numbers leave
        the device, whatever the vocabulary."""
        import torch

        if not ids:
            return []
        tokens = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=tokens).logits[0, :-1]  # (T-1, vocab)
            logprobs = logits.float().log_softmax(-1)
            chosen = logprobs.gather(1, tokens[0, 1:, None])[:, 0].cpu()
            best = logprobs.topk(top) if top else None
        scored = [TokenLogprob(self.token_text(ids, 0), None)]
        for k in range(1, len(ids)):
            alternatives = []
            if best is not None:
                values, choices = best.values[k - 1].tolist(), best.indices[k - 1].tolist()
                alternatives = self._texts(ids[:k], choices, values)
            scored.append(TokenLogprob(self.token_text(ids, k), float(chosen[k - 1]), alternatives))
        return scored

    def _top(self, logprobs, context: list[int], top: int) -> list[tuple[str, float]]:
        if not top:
            return []
        values, choices = logprobs.topk(top)
        return self._texts(context, choices.tolist(), values.tolist())

    def _texts(
        self, context: list[int], choices: list[int], values: list[float]
    ) -> list[tuple[str, float]]:
        """(text, log-probability) of each possible next token after `context`: its text as
        it would read there (a leading space kept, a special token empty), as `token_text`
        gives the chosen one's."""
        k = len(context)
        return [
            (self.token_text([*context[-_TOKEN_WINDOW:], choice], min(k, _TOKEN_WINDOW)), value)
            for choice, value in zip(choices, values, strict=True)
        ]


class _RowState:
    """One completion in progress: its tokens, its text and how much of it was sent."""

    def __init__(self, request: TextRequest, generator, owner: object = None):
        self.request = request
        self.generator = generator
        self.owner = owner  # whoever asked for it (the server's request)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already yielded
        self.finished = False
        self.error: Exception | None = None  # what failed this row alone (it has finished)
        self.prompt: list[TokenLogprob] | None = None  # the prompt scored, until sent
        self.scored: list[TokenLogprob] = []  # with logprobs: each token kept, its text set
        self.scored_sent = 0  # of them, how many were yielded
        self.scored_end = 0  # characters of the text the yielded ones cover

    def fail(self, exc: Exception) -> None:
        self.error, self.finished = exc, True

    def advance(
        self, token: int, model: LanguageModel, scored: TokenLogprob | None = None
    ) -> TextDelta:
        request = self.request
        finish = None
        if token in model.stop_token_ids:
            finish = "stop"
            if scored is not None:  # scored, without text, as the token that ended it
                scored.ends = True
                self.scored.append(scored)
        else:
            self.ids.append(token)
            if scored is not None:
                scored.text = model.token_text(self.ids, len(self.ids) - 1)
                self.scored.append(scored)
        text = model.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and len(self.ids) >= request.max_tokens:
            finish = "length"
        end = len(text) if finish else _safe_end(text, request.stop)
        delta = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        self.finished = finish is not None
        return self._delta(delta, finish, text)

    def finish_unsampled(self) -> TextDelta:
        """End a row that asked for no tokens (its prompt scored only)."""
        self.finished = True
        return self._delta("", "length", "")

    def _delta(self, delta: str, finish: str | None, text: str) -> TextDelta:
        """`delta` of `text`, with the tokens whose text has now been sent (at the end:
        those within the text, the last cut where a stop sequence cut it)."""
        logprobs = []
        while self.scored_sent < len(self.scored):
            token = self.scored[self.scored_sent]
            start = self.scored_end
            if finish:
                if start >= self.sent and token.text:
                    break  # past the end: a stop sequence cut the text before it
                token.text = token.text[: self.sent - start]
            elif start + len(token.text) > self.sent:
                break  # its text is still held back
            logprobs.append(token)
            self.scored_sent += 1
            self.scored_end += len(token.text)
        if finish and logprobs and self.scored_end < self.sent:
            # Bytes that never made a character, at the very end: the last token's.
            logprobs[-1].text += text[self.scored_end : self.sent]
            self.scored_end = self.sent
        prompt, self.prompt = self.prompt, None
        return TextDelta(delta, finish, len(self.ids), logprobs, prompt)


class DecodeBatch:
    """Completions decoded together, a token per step, sharing one KV cache.

    Rows join between steps (continuous batching: a new row's prompt is run on its own and
    its cache merged in) and leave when they finish. Merging needs the plain per-layer
    caches of full-attention models; with any other cache (sliding windows, ...) rows join
    only an empty batch and stay until all have finished, as in static batching.
    """

    def __init__(self, model: LanguageModel):
        self.model = model
        self.rows: list[_RowState] = []  # decoding, in cache order
        self.joining: list[_RowState] = []  # added, prompt not yet run
        self.cache = None
        self.mask = None  # (B, cached): 1 where the cache holds a real token of the row
        self.next_ids = None  # (B,): each row's latest token, fed at the next step
        self.mergeable = True

    def can_join(self) -> bool:
        return not self.rows or self.mergeable

    def add(self, requests: list[TextRequest], owner: object = None) -> list[_RowState]:
        """Rows for `requests`, which join at the next step (check `can_join` first)."""
        assert self.can_join()
        vocab = self.model.vocab_size
        for r in requests:
            bad = [i for i in r.prompt_ids if not 0 <= i < vocab]
            if bad:
                raise InputError(
                    f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})"
                )
        rows = [_RowState(r, _row_generator(r.seed), owner) for r in requests]
        self.joining += rows
        return rows

    def step(self) -> dict[_RowState, TextDelta | None]:
        """Decode one token of every row (the first of those joining); what each row
        added, None for rows already finished."""
        import torch

        deltas: dict[_RowState, TextDelta | None] = {}
        if self.rows:
            ones = torch.ones((len(self.rows), 1), dtype=torch.long)
            mask = torch.cat([self.mask, ones], dim=1)
            positions = self.mask.sum(-1, keepdim=True)  # real tokens before this one
            logits, self.cache = self.model.forward(
                self.next_ids[:, None], mask, positions, self.cache
            )
            self.mask = mask
            self.next_ids = self._sample(self.rows, logits, deltas)
        if self.joining:
            joining, self.joining = self.joining, []
            self._join(joining, deltas)
        return deltas

    def _join(self, joining: list[_RowState], deltas: dict) -> None:
        """Run the prompts of `joining` and merge them into the batch. If that fails, each
        request's rows are tried on their own, so one bad request fails only itself."""
        try:
            self._prefill(joining, deltas)
        except Exception as exc:
            owners: dict[object, list[_RowState]] = {}
            for row in joining:
                owners.setdefault(id(row.owner), []).append(row)
            if len(owners) == 1:
                for row in joining:
                    row.fail(exc)
                    deltas[row] = None
                return
            for rows in owners.values():
                self._join(rows, deltas)

    def _prefill(self, joining: list[_RowState], deltas: dict) -> None:
        """The prompts' forward pass, then the rows join; the batch changes only once
        everything has succeeded."""
        import torch

        # A row with no prompt starts from the beginning-of-text token.
        prompts = [r.request.prompt_ids or [self.model.bos_token_id] for r in joining]
        longest = max(len(p) for p in prompts)
        # Left-padded, so every row's next token comes out at position -1.
        ids = torch.full((len(joining), longest), self.model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(joining), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            mask[i, longest - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self.model.forward(ids, mask, positions, None)
        scored: dict[tuple, list[TokenLogprob]] = {}  # each prompt scored once (n copies)
        for row in joining:
            request = row.request
            if request.echo_logprobs:
                key = (tuple(request.prompt_ids), request.logprobs)
                if key not in scored:
                    scored[key] = self.model.prompt_logprobs(
                        request.prompt_ids, request.logprobs or 0
                    )
                row.prompt = scored[key]
        if self.rows:
            merged, merged_mask = _merge_caches(self.cache, self.mask, cache, mask)
        next_ids = self._sample(joining, logits, deltas)
        if self.rows:
            self.cache, self.mask = merged, merged_mask
            self.next_ids = torch.cat([self.next_ids, next_ids])
        else:
            self.cache, self.mask, self.next_ids = cache, mask, next_ids
            self.mergeable = _mergeable(cache)
        self.rows = self.rows + joining

    def drop(self, leaving) -> None:
        """Take out the rows for which `leaving(row)` is true (all at once, once all
        have finished, when rows cannot join and leave one by one)."""
        import torch

        keep = [i for i, row in enumerate(self.rows) if not leaving(row)]
        if len(keep) == len(self.rows) or (keep and not self.mergeable):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_ids = [], None, None, None
            return
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(torch.tensor(keep, device=self.model.device))
        self.mask, self.next_ids = self.mask[keep], self.next_ids[keep]
        # Columns no remaining row attends to (the left padding of rows that left).
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _sample(self, rows: list[_RowState], logits, deltas: dict):
        """Each row's next token (B,) from its logits (B, vocab); records the rows' deltas."""
        import torch

        next_ids = torch.full((len(rows),), self.model.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            deltas[row] = None
            if row.finished:
                continue
            try:
                request = row.request
                if request.max_tokens == 0:
                    deltas[row] = row.finish_unsampled()
                    continue
                token = _sample(logits[i], request, row.generator)
                scored = None
                if request.logprobs is not None:
                    # The tokens before it (as many as its text can depend on).
                    context = [*request.prompt_ids[-_TOKEN_WINDOW:], *row.ids[-_TOKEN_WINDOW:]]
                    scored = self.model.scored(logits[i], context, token, request.logprobs)
                deltas[row] = row.advance(token, self.model, scored)
                next_ids[i] = token
            except Exception as exc:  # this row's settings or text: it alone fails
                row.fail(exc)
        return next_ids


_TOKEN_WINDOW = 8  # tokens decoded before one to tell its text (a character spans <= 4)


def _row_generator(seed: int | None):
    """The random generator of one completion: seeded, or from fresh entropy."""
    import torch

    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def _mergeable(cache) -> bool:
    """Whether rows can join a batch with this cache: one plain key/value tensor pair
    (B, heads, T, head_dim) per layer, as full attention keeps."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers
    )


def _merge_caches(cache, mask, other, other_mask):
    """`cache` with `other`'s rows appended, both left-padded to the longer; and the mask.
    Every new tensor is made before `cache` is changed, so a failure leaves it whole."""
    import torch
    import torch.nn.functional as F

    length = max(mask.shape[1], other_mask.shape[1])

    def pad(x, dim_from_end: int):
        missing = length - x.shape[-dim_from_end]
        return F.pad(x, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else x

    merged = [
        (
            torch.cat([pad(layer.keys, 2), pad(joining.keys, 2)]),  # (B, H, T, D)
            torch.cat([pad(layer.values, 2), pad(joining.values, 2)]),
        )
        for layer, joining in zip(cache.layers, other.layers, strict=True)
    ]
    new_mask = torch.cat([pad(mask, 1), pad(other_mask, 1)])
    for layer, (keys, values) in zip(cache.layers, merged, strict=True):
        layer.keys, layer.values = keys, values
    return cache, new_mask


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent: not an incomplete UTF-8 character at the end, nor a
    tail that later tokens could complete into a stop sequence."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k : end] == stop[:k]:
                hold = max(hold, k)
                break
    return end - hold


def _sample(logits, request: TextRequest, generator) -> int:
    """Next token from (vocab,) logits: greedy at temperature 0, else nucleus sampling."""
    import torch

    if request.temperature == 0:
        return int(logits.argmax())
    # In float64 with the best logit subtracted first: however small the temperature, the
    # best token's scaled logit is 0 and the others finite or -inf, never inf - inf = NaN.
    scaled = (logits.double() - logits.max()) / request.temperature
    probs = torch.softmax(scaled, dim=-1)
    if request.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose probability reaches top_p.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= request.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
