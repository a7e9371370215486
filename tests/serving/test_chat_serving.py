"""The chat fine-tuned model behind `/v1/chat/completions` and `/v1/completions`, asked by
the official `openai` client and by lm-evaluation-harness, over real HTTP to Ray Serve."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import FACTS, ask
from tests.serving.deployments import start, stop


@pytest.fixture(scope="module", autouse=True)
def trained(base_model, chat_run, lora_chat_run):
    """Train first: the training fixtures need every CPU, which deployed replicas hold."""
    return base_model, chat_run, lora_chat_run


@pytest.fixture(scope="module")
def chat_url(chat_run, serve_port, tmp_path_factory):
    model = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(chat_run[1] / "model", model)
    url = start("facts", model, serve_port, limits={"max_tokens": 24})
    yield url, model
    stop("facts")


def openai_client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def client(chat_url):
    return openai_client(chat_url[0])


def ask_every_fact(client, model: str) -> int:
    """Ask each fact through the chat API, whole and streamed (which must agree); returns
    how many answers are exact."""
    answers, streamed = [], []
    for place, _ in FACTS:
        request = {
            "model": model,
            "messages": [{"role": "user", "content": ask(place)}],
            "temperature": 0,
        }
        answers.append(client.chat.completions.create(**request).choices[0])
        chunks = list(client.chat.completions.create(**request, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"  # the role comes first
        streamed.append("".join(c.choices[0].delta.content or "" for c in chunks))
        assert chunks[-1].choices[0].finish_reason == answers[-1].finish_reason == "stop"
    texts = [a.message.content for a in answers]
    assert streamed == texts
    print(f"{model}: {texts}")
    return sum(text == capital for text, (_, capital) in zip(texts, FACTS, strict=True))


def test_the_fine_tuned_model_answers_what_its_base_could_not(base_model, client):
    from raygen.serving.runtimes.text import LanguageModel, TextRequest

    base = LanguageModel(str(base_model))  # trained on code, no chat template
    before = 0
    for place, capital in FACTS:
        ids = base.encode(f"{ask(place)}\n")
        text = "".join(d.text for (d,) in base.generate([TextRequest(ids, 8, 0.0)]) if d)
        before += text.strip() == capital
    assert before == 0 and ask_every_fact(client, "facts") >= 0.75 * len(FACTS)


def test_the_lora_fine_tuned_model_answers_them_too(lora_chat_run, serve_port, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(lora_chat_run[2] / "model", model)
    url = start("lora", model, serve_port)
    try:
        exact = ask_every_fact(openai_client(url), "lora")
    finally:
        stop("lora")
    assert exact >= 0.75 * len(FACTS)


def test_chat_options_sampling_logprobs_and_usage(client, chat_url):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": ask(FACTS[0][0])}]},
    ]
    done = client.chat.completions.create(
        model="facts", messages=messages, n=3, seed=5, temperature=1.5, max_tokens=6
    )
    again = client.chat.completions.create(
        model="facts", messages=messages, n=3, seed=5, temperature=1.5, max_tokens=6
    )
    assert [c.message.content for c in done.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in done.choices] == [0, 1, 2]
    tokenizer = AutoTokenizer.from_pretrained(chat_url[1])
    flat = [{"role": m["role"], "content": ask(FACTS[0][0])} for m in messages[1:]]
    prompt = tokenizer.apply_chat_template(
        [messages[0], *flat], tokenize=False, add_generation_prompt=True
    )
    assert done.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    scored = client.chat.completions.create(
        model="facts", messages=messages, temperature=0, logprobs=True, top_logprobs=3
    ).choices[0]
    content = scored.logprobs.content
    assert "".join(t.token for t in content) == scored.message.content
    for token in content:  # greedy: each chosen token is the most likely one
        assert len(token.top_logprobs) == 3
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert bytes(token.bytes) == token.token.encode()
    usage = list(
        client.chat.completions.create(
            model="facts",
            messages=messages,
            stream=True,
            max_completion_tokens=4,
            stream_options={"include_usage": True},
        )
    )[-1].usage
    assert usage.prompt_tokens == done.usage.prompt_tokens and 0 < usage.completion_tokens <= 4


def test_completions_echo_and_score_token_prompts_like_transformers(client, chat_url):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_url[1])
    model = AutoModelForCausalLM.from_pretrained(chat_url[1]).eval()
    texts = [f"{ask(place)} {capital}" for place, capital in FACTS[:3]]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    done = client.completions.create(
        model="facts", prompt=prompts, max_tokens=0, echo=True, logprobs=2
    )
    for ids, text, choice in zip(prompts, texts, done.choices, strict=True):
        assert choice.text == text and choice.finish_reason == "length"
        logprobs = choice.logprobs
        assert "".join(logprobs.tokens) == text
        lengths = [len(t) for t in logprobs.tokens]
        assert logprobs.text_offset == [sum(lengths[:k]) for k in range(len(lengths))]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        for k in range(1, len(ids)):
            assert logprobs.token_logprobs[k] == pytest.approx(
                float(expected[k - 1, ids[k]]), abs=1e-4
            )
            assert len(logprobs.top_logprobs[k]) <= 3  # the 2 best and the chosen
    assert done.usage.completion_tokens == 0
    both = client.completions.create(
        model="facts", prompt=texts[0], max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    choice, scored = both.choices[0], len(prompts[0]) + both.usage.completion_tokens
    assert choice.text.startswith(texts[0]) and "".join(choice.logprobs.tokens) == choice.text
    # The prompt's tokens, the completion's, and the end-of-text token that stopped it.
    assert len(choice.logprobs.tokens) == scored + (choice.finish_reason == "stop")


LM_EVAL_ARGS = {"num_concurrent": 1, "max_retries": 1, "timeout": 60}


def _facts_task(name: str, tmp_path, rows: list[dict]) -> dict:
    """An lm-evaluation-harness task over `rows`, written as JSON Lines (no download)."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
    }


def test_lm_evaluation_harness_generates_through_chat_completions(chat_url, tmp_path):
    from lm_eval import simple_evaluate

    task = {
        **_facts_task("raygen_facts_chat", tmp_path, _fact_rows()),
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "temperature": 0},
        "metric_list": [{"metric": "exact_match"}],
    }
    results = simple_evaluate(
        model="local-chat-completions",
        model_args={
            "base_url": f"{chat_url[0]}/v1/chat/completions",
            "model": "facts",
            **LM_EVAL_ARGS,
        },
        tasks=[task],
        apply_chat_template=True,
    )
    score = results["results"]["raygen_facts_chat"]["exact_match,none"]
    assert score >= 0.75


def test_lm_evaluation_harness_loglikelihoods_equal_plain_transformers(chat_url, tmp_path):
    """A multiple-choice task through `local-completions` (echo + logprobs on token
    prompts), and the same task on plain transformers (lm-eval's `hf` model)."""
    from lm_eval import simple_evaluate

    model_dir = str(chat_url[1])
    task = {
        **_facts_task("raygen_facts_choice", tmp_path, _fact_rows(model_dir)),
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    }
    served = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{chat_url[0]}/v1/completions",
            "model": "facts",
            "tokenizer_backend": "huggingface",
            "tokenizer": model_dir,
            "max_length": 256,
            **LM_EVAL_ARGS,
        },
        tasks=[task],
    )
    plain = simple_evaluate(
        model="hf", model_args={"pretrained": model_dir, "device": "cpu"}, tasks=[task]
    )
    name = "raygen_facts_choice"

    def loglikelihoods(results) -> list[float]:
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        return [resp[0][0] for s in samples for resp in s["resps"]]

    assert loglikelihoods(served) == pytest.approx(loglikelihoods(plain), abs=1e-3)
    assert served["results"][name]["acc,none"] == plain["results"][name]["acc,none"] >= 0.75


def _fact_rows(model_dir: str | None = None) -> list[dict]:
    """Each fact as a question and answer; with a model, also as a multiple-choice item:
    the question rendered with its chat template, the capitals as choices."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir) if model_dir else None
    rows = []
    capitals = [capital for _, capital in FACTS]
    for i, (place, capital) in enumerate(FACTS):
        row = {"question": ask(place), "answer": capital}
        if tokenizer is not None:
            messages = [{"role": "user", "content": ask(place)}]
            row["prompt"] = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            choices = [capitals[(i + k) % len(capitals)] for k in range(4)]
            row["choices"], row["label"] = sorted(choices), sorted(choices).index(capital)
        rows.append(row)
    return rows


def test_audits_ask_a_chat_model_through_its_template(chat_run):
    """An outcome check's prompts reach a chat model as a user's turn, as served."""
    import pandas as pd

    from raygen.serving.audit.inference import _TextScorer

    class Tally:
        def add(self, n: int) -> None:
            pass

    model = str(chat_run[1] / "model")
    tasks = {"loss": False, "text_column": "text", "max_text_tokens": 64}
    scorer = _TextScorer(model, {**tasks, "completions": [(0, "prompt", 8, 0.0, 0)]}, Tally())
    batch = scorer(pd.DataFrame({"prompt": [ask(place) for place, _ in FACTS]}))
    right = sum(a == c for a, (_, c) in zip(batch["completion_0"], FACTS, strict=True))
    assert right >= 0.75 * len(FACTS), list(batch["completion_0"])
