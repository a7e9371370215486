"""A chat fine-tuning run end to end: conversations from JSON Lines and a Hugging Face data
set, a tokenizer trained here given the built-in ChatML template, the loss on the
assistant's tokens, and a model whose tokenizer renders chats as plain transformers does."""

from __future__ import annotations

import json

import pytest

from raygen.jobs.launch import launch
from raygen.jobs.loader import validate_spec
from raygen.jobs.spec import TrainSpec
from raygen.jobs.train.metrics import read_metrics
from tests.conftest import FACTS, LORA_STEPS, ask, chat_spec, facts_conversations, raygen


def test_conversations_are_prepared_with_truncation_counted(chat_run):
    _, run_dir = chat_run
    stats = json.loads((run_dir / "data" / "data_stats.json").read_text())
    assert stats["format"] == "chat" and stats["removed_invalid_conversation"] == 0
    rows = facts_conversations()
    assert stats["eval_examples"] == 2 * len(FACTS) and stats["removed_duplicates"] == 0
    assert stats["train_examples"] == len(rows)
    # Those after the long system prompt, and no other, are longer than a sequence.
    assert stats["train_truncated"] == sum(r["messages"][0]["role"] == "system" for r in rows)
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
    """LoRA under ZeRO-3 on a saved base model without a chat template, partitioned while
    it loads (the merged export matching base + adapter shows the weights loaded): the
    template's two tokens grow its embeddings."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tmp_path = tmp_path_factory.mktemp("lora")
    texts = [t["content"] for row in facts_conversations() for t in row["messages"]]
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


def test_a_lora_checkpoint_exports_the_model_the_run_exported(lora_run, tmp_path):
    """The checkpoint holds the adapters only: the export rebuilds the frozen weights (and
    the template's token rows) as the run built them."""
    import torch
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    from raygen.jobs.export import export_checkpoint

    _, run_dir, _ = lora_run
    out = export_checkpoint(str(run_dir), str(run_dir / "checkpoint_00000006"), str(tmp_path))
    ids = torch.arange(20)[None] * 7 % 300
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        trained = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()(ids).logits
    assert torch.equal(exported, trained)
    assert PeftConfig.from_pretrained(f"{out}/adapter").r == 8


def test_raygen_generate_answers_through_the_chat_template(chat_run):
    _, run_dir = chat_run
    model = str(run_dir / "model")
    place, capital = FACTS[3]
    greedy = raygen("generate", model, "--prompt", ask(place), "--chat", "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    # It stops at the end of its turn: the answer carries no template text.
    assert greedy.stdout.strip() == capital
    first = raygen("generate", model, "--prompt", "Hello?", "--chat", "--seed", "5")
    again = raygen("generate", model, "--prompt", "Hello?", "--chat", "--seed", "5")
    assert first.returncode == 0 and again.stdout == first.stdout  # seeded
    diffusion = raygen("generate", str(run_dir), "--prompt", "x")
    assert diffusion.returncode == 2 and "no config.json" in diffusion.stderr


def test_a_bad_line_found_while_preparing_is_named_and_nothing_is_kept(ray_session, tmp_path):
    from raygen.jobs.data.prepare import prepare_data
    from raygen.jobs.errors import SpecError
    from raygen.jobs.validate import validate_train_spec

    raw = chat_spec(tmp_path)
    with (tmp_path / "facts.jsonl").open("a") as out:
        out.write('{"messages": [{"role": "user", "content": "hi"}\n')  # cut short
    spec = validate_train_spec(validate_spec(TrainSpec, raw, "s"), "s")  # reads line 1 only
    line = len(facts_conversations()) + 1
    with pytest.raises(SpecError, match=rf"facts.jsonl line {line} is not JSON"):
        prepare_data(spec, str(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


def test_a_killed_lora_run_resumes_from_its_adapters(lora_chat_run):
    """Its checkpoints hold only the adapters: resuming rebuilds the frozen weights (from
    the base model) and loads the adapters and their optimizer state."""
    outcome, checkpointed, run_dir = lora_chat_run
    result = outcome["result"]
    assert result["status"] == "completed" and result["final_step"] == LORA_STEPS
    attempts = result["attempts"]
    assert len(attempts) == 2
    assert attempts[0]["resumed_from_step"] == 0
    assert attempts[1]["resumed_from_step"] >= max(checkpointed) >= 200
    assert attempts[1]["previous_error"].startswith("rank 0: worker process died")
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == LORA_STEPS
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
