"""Chat data: conversations read from every input format, rendered with a chat template
that plain transformers renders the same way, and the loss on the assistant's tokens only."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raygen.jobs.data import chat
from raygen.jobs.data.inputs import count_rows, file_columns, list_input_files, read_file
from raygen.jobs.errors import SpecError

CONVERSATION = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE (as raygen trains one) with the built-in ChatML template,
    saved and loaded back as transformers would."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [t["content"] for t in CONVERSATION] * 20 + ["the quick brown fox"] * 20
    bpe.train_from_iterator(corpus, vocab_size=300, special_tokens=["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    chat.apply_template(fast, "chatml")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def test_conversations_and_instruction_pairs_are_read_and_bad_ones_named():
    assert chat.conversation({"messages": CONVERSATION}) == CONVERSATION
    assert chat.conversation({"messages": json.dumps(CONVERSATION)}) == CONVERSATION
    pair = chat.conversation({"prompt": "2+2?", "response": "4"})
    assert pair == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    bad = {
        "no list": {"messages": None},
        "bad role": {"messages": [{"role": "bot", "content": "hi"}]},
        "no answer": {"messages": [{"role": "user", "content": "hi"}]},
        "assistant first": {"messages": CONVERSATION[2:]},
        "empty response": {"prompt": "hi", "response": ""},
    }
    reasons = {name: chat.conversation(row) for name, row in bad.items()}
    assert all(isinstance(r, str) for r in reasons.values()), reasons
    assert "role 'bot' is not one of system, user, assistant" in reasons["bad role"]


def test_the_template_renders_as_plain_transformers_does(tokenizer):
    rendered = chat.ChatTokenizer(tokenizer, 64, "assistant").render(CONVERSATION)
    assert rendered == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nAnswer with one word.<|im_end|>\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in chat.end_of_turn_ids(tokenizer)
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="set tokenizer.chat_template: chatml"):
        chat.apply_template(bare, None)


def test_only_the_assistants_turns_are_targets_up_to_their_end_of_turn(tokenizer):
    sequence = chat.ChatTokenizer(tokenizer, 128, "assistant")(CONVERSATION)
    ids, targets = sequence.input_ids, sequence.targets
    assert len(ids) == len(targets) == 128 and not sequence.truncated
    assert (targets[sequence.tokens :] == 0).all()  # padding is never a target
    # The targets are the two answers, each with its end of turn, and nothing else.
    marked = np.flatnonzero(targets)
    runs = np.split(marked, np.flatnonzero(np.diff(marked) > 1) + 1)
    assert [tokenizer.decode(ids[run]) for run in runs] == [
        "Paris<|im_end|>\n",
        "Rome<|im_end|>\n",
    ]
    every = chat.ChatTokenizer(tokenizer, 128, "all")(CONVERSATION)
    assert every.targets.sum() == every.tokens  # loss_on all: every real token


def test_long_conversations_are_truncated_and_say_so(tokenizer):
    short = chat.ChatTokenizer(tokenizer, 16, "assistant")(CONVERSATION)
    assert short.truncated and short.tokens == 16 and len(short.input_ids) == 16


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # Renders only the conversation's length: a prefix is not the start of the whole.
    odd.chat_template = "{{ messages | length }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(chat.TemplateError, match="renders the start of a conversation"):
        chat.ChatTokenizer(odd, 64, "assistant")(CONVERSATION)


def test_the_loss_counts_the_assistants_tokens_only(tokenizer):
    """masked_loss against a hand computation over the target tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from raygen.jobs.train.lm import masked_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64)
    ).eval()
    rows = [chat.ChatTokenizer(tokenizer, 64, "assistant")(CONVERSATION) for _ in range(2)]
    batch = {
        "input_ids": torch.tensor(np.stack([r.input_ids for r in rows])),
        "targets": torch.tensor(np.stack([r.targets for r in rows])),
    }
    with torch.no_grad():
        summed, counted = masked_loss(model, batch)
        logits = model(input_ids=batch["input_ids"].long()).logits
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(1, 64):
            if batch["targets"][b, t]:
                log_probs = torch.log_softmax(logits[b, t - 1].double(), -1)
                expected -= log_probs[batch["input_ids"][b, t]].item()
                n += 1
    assert counted.item() == n == 2 * int(rows[0].targets.sum())
    assert summed.item() == pytest.approx(expected, rel=1e-5)


def write_inputs(root) -> dict[str, str]:
    """The same three conversations as Parquet, JSON Lines and a Hugging Face data set."""
    import datasets

    rows = [
        {"messages": CONVERSATION[1:3], "topic": "geo"},
        {"messages": CONVERSATION[3:5], "topic": "geo"},
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
        | {"topic": "math"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "chats.parquet")
    (root / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = datasets.Dataset.from_list(rows)
    data.save_to_disk(str(root / "hub"))
    datasets.DatasetDict({"train": data, "test": data}).save_to_disk(str(root / "hubdict"))
    return {"parquet": root / "chats.parquet", "jsonl": root / "chats.jsonl", "hub": root / "hub"}


def test_parquet_json_lines_and_hugging_face_data_sets_read_alike(tmp_path):
    paths = write_inputs(tmp_path)
    tables = {}
    for kind, path in paths.items():
        (f,) = list_input_files([str(path)], "data.train", None)
        assert f.kind == {"parquet": "parquet", "jsonl": "jsonl", "hub": "arrow"}[kind]
        assert {"messages", "topic"} <= set(file_columns(f, "data.train"))
        assert count_rows([f]) == 3
        if kind != "parquet":
            tables[kind] = read_file(f.path, f.kind, ["messages"], "data.train")
    as_read = [t["messages"].to_pylist() for t in tables.values()]
    assert as_read[0] == as_read[1] == pq.read_table(paths["parquet"])["messages"].to_pylist()
    hashes = [t["row_hash"].to_pylist() for t in tables.values()]
    assert all(len(set(h)) == 3 for h in hashes)  # a row hash per row
    again = read_file(str(paths["jsonl"]), "jsonl", ["messages"], "k")
    assert again["row_hash"].to_pylist() == hashes[0]  # the same on every read


def test_inputs_in_object_storage_read_as_local_ones(tmp_path, bucket):
    import boto3

    paths = write_inputs(tmp_path)
    client = boto3.client("s3")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"chats/{path.relative_to(tmp_path)}")
    for kind, path in paths.items():
        (local,) = list_input_files([str(path)], "data.train", None)
        (remote,) = list_input_files([f"s3://{bucket}/chats/{path.name}"], "k", None)
        assert remote.kind == local.kind and count_rows([remote]) == 3
        if kind != "parquet":
            read = read_file(remote.path, remote.kind, ["messages"], "k")
            here = read_file(local.path, local.kind, ["messages"], "k")
            assert read["messages"].to_pylist() == here["messages"].to_pylist()


def test_input_mistakes_are_named(tmp_path):
    write_inputs(tmp_path)
    with pytest.raises(SpecError, match="DatasetDict with splits train, test; name one"):
        list_input_files([str(tmp_path / "hubdict")], "data.train", None)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SpecError, match="is not a Parquet .* or JSON Lines"):
        list_input_files([str(tmp_path / "notes.txt")], "data.train", None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(SpecError, match="broken.jsonl line 2 is not JSON"):
        read_file(str(broken), "jsonl", ["messages"], "data.train")
