"""A chat fine-tuning run end to end: conversations from JSON Lines and a Hugging Face data
set, a tokenizer trained here given the built-in ChatML template, the loss on the
assistant's tokens, and a model whose tokenizer renders chats as plain transformers does."""

from __future__ import annotations

import json
import random

import pytest

from raygen.jobs.launch import launch
from raygen.jobs.loader import validate_spec
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.metrics import read_metrics
from tests.conftest import raygen, with_overrides


def conversations(count: int, seed: int) -> list[dict]:
    """Sums to answer, some after a long system prompt (longer than a sequence)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randrange(50), rng.randrange(50)
        turns = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a + b}"},
        ]
        if i % 10 == 0:
            turns.insert(0, {"role": "system", "content": "You add numbers. " * 40})
        rows.append({"messages": turns})
    return rows


def chat_spec(tmp_path, **overrides) -> dict:
    import datasets

    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in conversations(600, 0)) + "\n")
    datasets.Dataset.from_list(conversations(60, 1)).save_to_disk(str(tmp_path / "eval"))
    spec = {
        "name": "chat",
        "model": {"arch": "gpt2", "config": {"n_layer": 2, "n_embd": 64, "n_head": 4}},
        "data": {
            "format": "chat",
            "train": str(train),
            "eval": str(tmp_path / "eval"),
            "seq_len": 48,
        },
        "tokenizer": {"train": {"vocab_size": 400}, "chat_template": "chatml"},
        "train": {
            "max_steps": 30,
            "micro_batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 3,
            "log_every": 5,
            "eval_every": 30,
            "eval_batches": 4,
            "checkpoint_every": 30,
        },
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"storage": str(tmp_path / "runs")},
    }
    return with_overrides(spec, overrides)


@pytest.fixture(scope="module")
def chat_run(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("chat")
    spec = validate_spec(TrainSpec, chat_spec(tmp_path), "test")
    result = launch(spec, "test")
    return result, tmp_path / "runs" / "chat"


def test_conversations_are_prepared_with_truncation_counted(chat_run):
    _, run_dir = chat_run
    stats = json.loads((run_dir / "data" / "data_stats.json").read_text())
    assert stats["format"] == "chat" and stats["removed_invalid_conversation"] == 0
    assert stats["train_examples"] + stats["eval_examples"] == stats["rows_out"]
    # One in ten conversations has a system prompt longer than a sequence.
    assert stats["train_truncated"] == pytest.approx(stats["train_examples"] / 10, abs=8)
    assert 0 < stats["train_loss_tokens"] < stats["train_tokens"] / 3


def test_the_loss_counts_assistant_tokens_and_falls(chat_run):
    result, run_dir = chat_run
    assert result["status"] == "completed"
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]
    stats = json.loads((run_dir / "data" / "data_stats.json").read_text())
    # A step's 8 x 2 conversations bring their share of the assistant tokens, not every token.
    per_step = 16 * stats["train_loss_tokens"] / stats["train_examples"]
    assert all(abs(r["loss_tokens"] - per_step) < per_step / 2 for r in rows), rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0


def test_the_model_carries_the_template_plain_transformers_uses(chat_run):
    from transformers import AutoTokenizer, GenerationConfig

    _, run_dir = chat_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    ends = GenerationConfig.from_pretrained(run_dir / "model").eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ends


def test_chat_specs_are_checked_before_anything_runs(tmp_path):
    from raygen.jobs.errors import SpecError
    from raygen.jobs.validate import validate_train_spec

    raw = chat_spec(tmp_path, tokenizer={"train": {"vocab_size": 400}})
    raw["data"]["messages_column"] = "dialogue"
    with pytest.raises(SpecError) as info:
        validate_train_spec(validate_spec(TrainSpec, raw, "s"), "s")
    found = "\n".join(info.value.problems)
    assert "`tokenizer.chat_template`: a tokenizer trained here has no chat template" in found
    assert "has no column 'dialogue'; its columns are messages" in found
    text = chat_spec(tmp_path, data__format="text", train__loss_on="assistant")
    with pytest.raises(SpecError, match="`train.loss_on`: assistant needs conversations"):
        validate_train_spec(validate_spec(TrainSpec, text, "s"), "s")


@pytest.fixture(scope="module")
def lora_run(ray_session, tmp_path_factory):
    """LoRA under ZeRO-3 on a saved base model without a chat template: the template's two
    tokens grow its embeddings and train with the adapters."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tmp_path = tmp_path_factory.mktemp("lora")
    texts = [t["content"] for row in conversations(200, 2) for t in row["messages"]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    base = tmp_path / "base"
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    raw = chat_spec(
        tmp_path,
        name="lora",
        model={"pretrained": str(base), "lora": {"r": 8, "alpha": 16}},
        tokenizer={"chat_template": "chatml"},
        deepspeed={"zero_stage": 3},
    )
    raw["train"].update(max_steps=6, checkpoint_every=3, eval_every=6, log_every=3)
    result = launch(validate_spec(TrainSpec, raw, "test"), "test")
    return result, tmp_path / "runs" / "lora", base


def test_a_lora_run_checkpoints_only_its_adapters(lora_run):
    result, run_dir, base = lora_run
    assert result["status"] == "completed" and result["final_step"] == 6
    checkpoint = sum(f.stat().st_size for f in (run_dir / "checkpoint_000006").rglob("*.pt"))
    weights = (base / "model.safetensors").stat().st_size
    assert checkpoint < weights / 2  # adapters and their Adam moments, not the frozen base


def test_lora_exports_a_merged_model_and_an_adapter_that_agree(lora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, base = lora_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert tokenizer.chat_template  # both exports carry the tokenizer and its template
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()

    def base_model():
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        model.resize_token_embeddings(len(tokenizer))  # the template's tokens, as in training
        return model

    adapted = PeftModel.from_pretrained(base_model(), run_dir / "adapter").eval()
    messages = [{"role": "user", "content": "What is 7 plus 8?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = merged(ids).logits
        assert torch.allclose(logits, adapted(ids).logits, atol=1e-3)
        assert not torch.allclose(logits, base_model()(ids).logits, atol=1e-3)  # it trained


def test_raygen_generate_answers_through_the_chat_template(chat_run):

    _, run_dir = chat_run
    model = str(run_dir / "model")
    first = raygen("generate", model, "--prompt", "What is 3 plus 4?", "--chat", "--seed", "5")
    assert first.returncode == 0, first.stderr
    again = raygen("generate", model, "--prompt", "What is 3 plus 4?", "--chat", "--seed", "5")
    assert again.stdout == first.stdout  # seeded
    # It stops at the end of its turn: the answer carries no template text.
    assert "<|im_start|>" not in first.stdout and len(first.stdout) < 200
    diffusion = raygen("generate", str(run_dir), "--prompt", "x")
    assert diffusion.returncode == 2 and "no config.json" in diffusion.stderr


def test_a_bad_line_found_while_preparing_is_named_and_nothing_is_kept(ray_session, tmp_path):
    from raygen.jobs.data.prepare import prepare_data
    from raygen.jobs.errors import SpecError
    from raygen.jobs.validate import validate_train_spec

    raw = chat_spec(tmp_path)
    with (tmp_path / "train.jsonl").open("a") as out:
        out.write('{"messages": [{"role": "user", "content": "hi"}\n')  # cut short
    spec = validate_train_spec(validate_spec(TrainSpec, raw, "s"), "s")  # reads line 1 only
    with pytest.raises(SpecError, match=r"train.jsonl line 601 is not JSON"):
        prepare_data(spec, str(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()
