"""LoRA on causal LMs: only the adapters train, and the two exports (merged model, base +
adapter) compute what the trained model computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from raygen.jobs.models.lora import add_lora, load_lora, trainable_parameters, unknown_targets
from raygen.jobs.spec import LoraSpec

CONFIG = GPT2Config(vocab_size=96, n_layer=2, n_embd=32, n_head=2, n_positions=32)


def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG).eval()


def test_only_the_adapters_and_new_token_rows_train():
    model = add_lora(tiny_model(), LoraSpec(r=4, target_modules="all-linear"), [94, 95])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)  # the two added token rows
    count, total = trainable_parameters(model)
    assert 0 < count < total / 5


def test_merged_export_and_base_plus_adapter_give_the_trained_logits(tmp_path):
    from peft import PeftModel

    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    trained = add_lora(tiny_model(), LoraSpec(r=4, alpha=8, target_modules=["c_attn"]), [95])
    with torch.no_grad():  # as after training: every adapter (and the new row) moved
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    ids = torch.randint(0, 96, (2, 16))
    ids[0, 3] = 95
    with torch.no_grad():
        expected = trained(input_ids=ids).logits

    copy = load_lora(CONFIG, trained.state_dict(), trained.peft_config["default"])
    copy.save_pretrained(tmp_path / "adapter")
    copy.merge_and_unload().save_pretrained(tmp_path / "model")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
        assert torch.allclose(adapted(input_ids=ids).logits, expected, atol=1e-4)


def test_unknown_target_modules_are_named_with_the_choices():
    unknown, linear = unknown_targets(CONFIG, ["c_attn", "q_proj"])
    assert unknown == ["q_proj"]
    assert {"c_attn", "c_proj", "c_fc"} <= set(linear)


def test_lora_is_refused_where_it_does_not_apply():
    from raygen.jobs.errors import SpecError
    from raygen.jobs.loader import validate_spec
    from raygen.jobs.spec import TrainSpec
    from raygen.jobs.validate import validate_train_spec

    raw = {
        "name": "x",
        "model": {"family": "diffusion", "arch": "unet2d", "lora": {"r": 4}},
        "data": {"train": "builtin:digits"},
    }
    with pytest.raises(SpecError, match="`model.lora`: LoRA adapts causal language models"):
        validate_train_spec(validate_spec(TrainSpec, raw, "s"), "s")
    lm = {
        "name": "x",
        "model": {"arch": "gpt2", "lora": {"target_modules": ["q_proj"]}},
        "data": {"train": "builtin:python-stdlib"},
    }
    with pytest.raises(SpecError, match="q_proj matches no module of this gpt2 model"):
        validate_train_spec(validate_spec(TrainSpec, lm, "s"), "s")
