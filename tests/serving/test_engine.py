"""Continuous batching (serving/engine.py, DecodeBatch in serving/runtimes/text.py), without Ray:
a tiny random GPT-2 and a BPE tokenizer trained here on stdlib text."""

from __future__ import annotations

import queue
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from raygen.serving.engine import ImageEngine, TextEngine, Update
from raygen.serving.runtimes.text import DecodeBatch, LanguageModel, TextRequest

PROMPTS = [
    "import os\n",
    "def main():\n    return",
    "class Parser(object):\n    def __init__(self",
    "x = [i * i for i in range(10)]\nprint(",
    "# Copyright",
    "for key, value in sorted(items.items()):\n        if",
]


def _save_model(out: Path, arch: str, **config) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    bpe = ByteLevelBPETokenizer()
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:20]]
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=eos, bos_token=eos, pad_token=eos
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(arch, vocab_size=len(tokenizer), eos_token_id=0, **config)
    )
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> LanguageModel:
    out = tmp_path_factory.mktemp("gpt2")
    _save_model(out, "gpt2", n_layer=2, n_embd=32, n_head=2, n_positions=256)
    return LanguageModel(str(out))


def _alone(lm: LanguageModel, request: TextRequest) -> str:
    return "".join(d[0].text for d in lm.generate([request]) if d[0] is not None)


def _requests(lm: LanguageModel, temperature: float = 0.0) -> list[TextRequest]:
    return [
        TextRequest(lm.encode(p), 5 + 4 * i, temperature, seed=i) for i, p in enumerate(PROMPTS)
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_joining_a_running_batch_generate_what_they_would_alone(lm, temperature):
    requests = _requests(lm, temperature)
    alone = [_alone(lm, r) for r in requests]
    batch, texts, first_used, dropped = DecodeBatch(lm), {}, [], False
    waiting = list(enumerate(requests))
    while waiting or batch.rows:
        if waiting:  # one joins at every step, while the others run and finish
            i, request = waiting.pop(0)
            batch.add([request], owner=i)
            texts[i] = ""
        for row, delta in batch.step().items():
            texts[row.owner] += delta.text if delta else ""
        batch.drop(lambda row: row.finished)
        if batch.rows:
            # Finished rows left, and the columns only they used went with them: the
            # cache's first column holds a real token of some running row.
            first_used.append(bool(batch.mask[:, 0].any()))
            dropped = dropped or len(batch.rows) < len(texts) - len(waiting)
    assert [texts[i] for i in range(len(requests))] == alone
    assert batch.mergeable and dropped and all(first_used)


def test_sliding_window_models_batch_without_merging(tmp_path):
    out = _save_model(
        tmp_path,
        "mistral",
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,
    )
    lm = LanguageModel(str(out))
    requests = _requests(lm)[:3]
    alone = [_alone(lm, r) for r in requests]
    batch = DecodeBatch(lm)
    batch.add(requests[:2])
    batch.step()
    assert not batch.mergeable and not batch.can_join()  # the others wait for an empty batch
    steps = list(lm.generate(requests[:2]))
    together = ["".join(step[i].text for step in steps if step[i]) for i in range(2)]
    assert together == alone[:2]
    # Through the engine: rows that finish early stay in the batch, their requests are
    # answered once.
    engine = TextEngine(lm, max_batch_size=8, wait_s=0.5)
    try:
        whole, streamed = [Collector() for _ in requests], [Collector() for _ in requests]
        for request, w, st in zip(requests, whole, streamed, strict=True):
            engine.submit([request], w, stream=False)
            engine.submit([request], st, stream=True)
        for i, (w, st) in enumerate(zip(whole, streamed, strict=True)):
            assert [u.deltas[0].text for u in w.until_done()] == [alone[i]]
            assert "".join(u.deltas[0].text for u in st.until_done() if u.deltas[0]) == alone[i]
    finally:
        engine.close()
    assert all(c.updates.empty() for c in whole + streamed)


class Collector:
    """Receives an engine's deliveries (on its thread) for the test to wait on."""

    def __init__(self):
        self.updates: queue.Queue = queue.Queue()

    def __call__(self, update) -> None:
        self.updates.put(update)

    def until_done(self, timeout: float = 60) -> list[Update]:
        out = []
        while not out or not out[-1].done:
            out.append(self.updates.get(timeout=timeout))
        return out


def test_engine_answers_whole_or_streamed_completions_joining_at_the_next_token(lm):
    sizes: list[int] = []
    engine = TextEngine(lm, max_batch_size=4, on_step=sizes.append)
    try:
        requests = _requests(lm)
        alone = [_alone(lm, r) for r in requests]
        long = Collector()
        engine.submit([TextRequest(lm.encode("import"), 60, 0.0)], long, stream=True)
        long.updates.put(long.updates.get(timeout=60))  # it is decoding
        whole, streamed = [Collector() for _ in requests], [Collector() for _ in requests]
        for request, w, s in zip(requests, whole, streamed, strict=True):
            engine.submit([request], w, stream=False)
            engine.submit([request], s, stream=True)
        for i, (w, s) in enumerate(zip(whole, streamed, strict=True)):
            (final,) = w.until_done()
            assert final.deltas[0].text == alone[i]
            steps = s.until_done()
            assert "".join(u.deltas[0].text for u in steps if u.deltas[0]) == alone[i]
            assert steps[-1].deltas[0].finish_reason == final.deltas[0].finish_reason
            # Steps a stream sends as one chunk (those queued while it was behind).
            merged = steps[0]
            for later in steps[1:]:
                merged = merged.then(later)
            assert merged.done and merged.deltas[0].text == alone[i]
            assert merged.deltas[0].tokens == final.deltas[0].tokens
            assert merged.deltas[0].finish_reason == final.deltas[0].finish_reason
        long.until_done()
    finally:
        engine.close()
    assert max(sizes) == 4  # later requests joined the running one, up to the cap


def test_a_request_for_several_completions_gets_them_together(lm):
    engine = TextEngine(lm, max_batch_size=2)
    try:
        requests = _requests(lm)[:3]  # more than a batch: it runs alone, all at once
        got = Collector()
        engine.submit(requests, got, stream=False)
        (final,) = got.until_done()
        assert engine.alive()
    finally:
        engine.close()
    assert not engine.alive()  # what the replica's health check looks at
    assert [d.text for d in final.deltas] == [_alone(lm, r) for r in requests]
    assert final.batch_size == 3


def test_a_cancelled_request_stops_being_decoded(lm):
    sizes: list[int] = []
    engine = TextEngine(lm, max_batch_size=8, on_step=sizes.append)
    try:
        gone, stays = Collector(), Collector()
        ticket = engine.submit([TextRequest(lm.encode("import"), 100, 0.0)], gone, stream=True)
        gone.updates.get(timeout=60)
        engine.submit([TextRequest(lm.encode("import"), 30, 0.0)], stays, stream=True)
        stays.updates.get(timeout=60)
        engine.cancel(ticket)
        delivered = gone.updates.qsize()
        stays.until_done()
    finally:
        engine.close()
    assert sizes[-1] == 1  # the other request was decoded alone after the cancel
    assert gone.updates.qsize() <= delivered + 1  # at most the step under way


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(lm, monkeypatch):
    engine = TextEngine(lm, max_batch_size=8)
    real = lm.forward
    try:
        monkeypatch.setattr(lm, "forward", lambda *a: (_ for _ in ()).throw(MemoryError("oom")))
        failed = Collector()
        engine.submit(_requests(lm)[:1], failed, stream=False)
        (update,) = failed.until_done()
        assert update.error == "MemoryError: oom"
        monkeypatch.setattr(lm, "forward", real)
        ok = Collector()
        engine.submit(_requests(lm)[:1], ok, stream=False)
        (update,) = ok.until_done()
        assert update.error is None and update.deltas[0].text == _alone(lm, _requests(lm)[0])
    finally:
        engine.close()


def test_a_tiny_temperature_samples_like_greedy_decoding(lm):
    # 1e-30 made the logits infinite (a 500 for the whole batch); 1e-320 is subnormal.
    for temperature in (1e-30, 1e-320):
        for request in _requests(lm)[:3]:
            greedy = _alone(lm, request)
            request.temperature = temperature
            assert _alone(lm, request) == greedy


def test_one_bad_request_fails_alone_and_the_batch_goes_on(lm, monkeypatch):
    """A request the model cannot take (a token outside the vocabulary: 400) and one whose
    sampling raises (500) fail on their own; the requests decoded with them are answered
    as if alone, and so is one after."""
    import raygen.serving.runtimes.text as models

    real_sample = models._sample

    def sample(logits, request, generator):
        if request.top_p == 0.5:
            raise RuntimeError("sampling broke")
        return real_sample(logits, request, generator)

    monkeypatch.setattr(models, "_sample", sample)
    good = _requests(lm)[:2]
    alone = [_alone(lm, r) for r in good]
    unknown_token = TextRequest([lm.vocab_size + 5], 5, 0.0)
    breaks = TextRequest(lm.encode("import"), 5, 1.0, top_p=0.5, seed=1)
    engine = TextEngine(lm, max_batch_size=8, wait_s=0.5)  # all four start together
    try:
        got = [Collector() for _ in range(4)]
        for request, collector in zip([good[0], unknown_token, breaks, good[1]], got, strict=True):
            engine.submit([request], collector, stream=False)
        first, bad_input, broken, second = (c.until_done()[-1] for c in got)
        after = Collector()
        engine.submit([good[0]], after, stream=False)
        (later,) = after.until_done()
    finally:
        engine.close()
    assert bad_input.status == 400 and "outside the model's vocabulary" in bad_input.error
    assert broken.status == 500 and broken.error == "RuntimeError: sampling broke"
    assert first.error is None and first.deltas[0].text == alone[0]
    assert second.error is None and second.deltas[0].text == alone[1]
    assert first.batch_size >= 2  # they were decoded together
    assert later.deltas[0].text == alone[0]


def test_an_engine_with_work_and_no_progress_reports_how_long(lm, monkeypatch):
    import threading

    release = threading.Event()
    real = lm.forward

    def stuck(*args):
        release.wait(timeout=60)
        return real(*args)

    engine = TextEngine(lm, max_batch_size=8)
    try:
        assert engine.stalled_for() == 0.0  # idle is not stalled
        time.sleep(0.2)
        monkeypatch.setattr(lm, "forward", stuck)
        got = Collector()
        engine.submit(_requests(lm)[:1], got, stream=False)
        time.sleep(0.5)
        assert 0.4 < engine.stalled_for() < 5  # counted from the work's arrival, not idle
        release.set()
        got.until_done()
        assert engine.stalled_for() == 0.0 and engine.running == 0 and engine.queued() == 0
    finally:
        release.set()
        engine.close()


def _log_softmax(lm: LanguageModel, ids: list[int]) -> torch.Tensor:
    """Plain transformers: each position's next-token log-probabilities, (T, vocab)."""
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_logprobs_are_the_models_own_and_their_tokens_spell_the_text(lm):
    engine = TextEngine(lm, max_batch_size=8)
    try:  # rows of different lengths scored together (left padding), whole and streamed
        requests = [
            TextRequest(lm.encode(p), 8, 0.0, logprobs=3, echo_logprobs=True) for p in PROMPTS
        ]
        requests.append(TextRequest(lm.encode("é€ ✓ x"), 0, logprobs=2, echo_logprobs=True))
        whole, streamed = Collector(), Collector()
        engine.submit(requests, whole, stream=False)
        engine.submit(requests, streamed, stream=True)
        (final,) = whole.until_done()
        steps = streamed.until_done()
    finally:
        engine.close()
    for i, (request, delta) in enumerate(zip(requests, final.deltas, strict=True)):
        prompt, completion = request.prompt_ids, delta.logprobs
        expected = _log_softmax(lm, prompt)
        assert delta.prompt[0].logprob is None  # nothing predicts the first token
        for k, token in enumerate(delta.prompt[1:], start=1):
            assert token.logprob == pytest.approx(float(expected[k - 1, prompt[k]]), abs=1e-4)
            assert len(token.top) == request.logprobs
        assert "".join(t.text for t in delta.prompt) == lm.decode(prompt)
        assert "".join(t.text for t in completion) == delta.text
        assert len(completion) == delta.tokens  # (no end token: every row ran to its length)
        for token in completion:  # greedy: each token is the best at its position
            assert token.logprob == pytest.approx(token.top[0][1])
        if completion:  # the first generated token, against plain transformers
            assert completion[0].logprob == pytest.approx(float(expected[-1].max()), abs=1e-4)
        pieces = [d.deltas[i] for d in steps if d.deltas[i] is not None]
        assert [t.logprob for p in pieces for t in p.logprobs] == [t.logprob for t in completion]
        assert sum(p.prompt is not None for p in pieces) == 1  # the prompt's come once
    assert final.deltas[-1].text == "" and final.deltas[-1].finish_reason == "length"


def test_a_stop_sequence_cuts_the_tokens_with_the_text(lm):
    request = TextRequest(lm.encode("def main():\n    return"), 30, 0.0, logprobs=0)
    (full,) = [d for d in _deltas(lm, request)]
    cut_at = full.text[len(full.text) // 2 :][:3]  # a stop inside the greedy completion
    request.stop = [cut_at]
    (cut,) = [d for d in _deltas(lm, request)]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(cut_at)]
    assert "".join(t.text for t in cut.logprobs) == cut.text
    assert [t.logprob for t in cut.logprobs] == [t.logprob for t in full.logprobs][
        : len(cut.logprobs)
    ]


def _deltas(lm: LanguageModel, request: TextRequest) -> list:
    """The whole completion of one request, as one delta."""
    whole = None
    for (delta,) in lm.generate([request]):
        if delta is not None:
            whole = delta if whole is None else whole.then(delta)
    return [whole]


def test_image_requests_waiting_while_the_model_runs_form_the_next_batch():
    import threading

    started, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def generate(jobs: list[int]) -> list[int]:
        batches.append(jobs)
        started.set()
        release.wait(timeout=60)
        if -1 in jobs:
            raise ValueError("bad job")
        return [job * 10 for job in jobs]

    engine = ImageEngine(generate, max_batch_size=3)
    try:
        results = [Collector() for _ in range(5)]
        engine.submit(0, 1, results[0])
        started.wait(timeout=60)
        for job in range(1, 5):  # arrive while job 0 runs
            engine.submit(job, 1, results[job])
        release.set()
        got = [r.updates.get(timeout=60) for r in results]
        # A job that fails its batch: the batch is retried one job at a time, so only
        # that job's request fails.
        release.clear()
        started.clear()
        blocker = Collector()
        engine.submit(9, 1, blocker)
        started.wait(timeout=60)
        failed, fine = Collector(), Collector()
        engine.submit(-1, 1, failed)
        engine.submit(5, 1, fine)
        release.set()
        error = failed.updates.get(timeout=60)
        answered = fine.updates.get(timeout=60)
    finally:
        release.set()
        engine.close()
    assert batches[:3] == [[0], [1, 2, 3], [4]]
    assert got == [(0, 1), (10, 3), (20, 3), (30, 3), (40, 1)]
    assert batches[-3:] == [[-1, 5], [-1], [5]]
    assert isinstance(error, ValueError) and answered == (50, 1)


def test_a_stream_that_fell_behind_gets_the_queued_steps_as_one_then_the_error():
    """The replica hands a stream every step queued since it last sent one, merged (two
    completions, one already ended), and a failure behind them after them."""
    import asyncio
    from types import SimpleNamespace

    from raygen.serving.api import ApiError
    from raygen.serving.app import ModelServer
    from raygen.serving.runtimes.text import TextDelta

    class QueuedEngine:  # delivers its updates at once, as if the stream had fallen behind
        def __init__(self, updates: list[Update]):
            self.updates, self.cancelled = updates, False

        def submit(self, jobs, deliver, stream):
            for update in self.updates:
                deliver(update)
            return object()

        def cancel(self, ticket):
            self.cancelled = True

    replica = ModelServer  # its methods, on a stand-in without a model
    server = SimpleNamespace(deadline_s=60.0)
    server._within_deadline = lambda *args: replica._within_deadline(server, *args)
    server.engine = QueuedEngine(
        [
            Update([TextDelta("a", None, 1), TextDelta("x", "stop", 1)], 2, False),
            Update([TextDelta("b", None, 2), None], 2, False),
            Update([TextDelta("c", "length", 3), None], 1, True),
        ]
    )

    async def consume() -> list[Update]:
        return [update async for update in replica._generate(server, [], stream=True)]

    (merged,) = asyncio.run(consume())
    assert merged.done and merged.batch_size == 2
    first, second = merged.deltas
    assert (first.text, first.finish_reason, first.tokens) == ("abc", "length", 3)
    assert (second.text, second.finish_reason, second.tokens) == ("x", "stop", 1)

    failing = Update([], 0, True, "RuntimeError: out of memory", 500)
    server.engine = QueuedEngine([Update([TextDelta("a", None, 1)], 1, False), failing])
    got: list[Update] = []

    async def until_failure() -> None:
        async for update in replica._generate(server, [], stream=True):
            got.append(update)

    with pytest.raises(ApiError) as error:
        asyncio.run(until_failure())
    assert [u.deltas[0].text for u in got] == ["a"] and error.value.status == 500
    assert server.engine.cancelled
