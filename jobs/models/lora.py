"""LoRA adapters on causal language models (PEFT): added to a built model, and exported as
a merged model and a PEFT adapter. Pure PEFT and transformers: state dicts in, files out."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from raygen.jobs.spec import LoraSpec


def lora_config(spec: LoraSpec, new_token_ids: list[int]) -> LoraConfig:
    """PEFT's config for `spec`. `new_token_ids`: rows of the input embedding added for a
    chat template's tokens, trained too (they start from samples around the others' mean)."""
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        trainable_token_indices=new_token_ids or None,
        task_type="CAUSAL_LM",
    )


def add_lora(model: PreTrainedModel, spec: LoraSpec, new_token_ids: list[int]) -> PeftModel:
    """`model` with frozen weights and trainable adapters."""
    return get_peft_model(model, lora_config(spec, new_token_ids))


def unknown_targets(config: PretrainedConfig, targets: list[str]) -> tuple[list[str], list[str]]:
    """Names in `targets` matching no module of a model with `config` (PEFT matches a name
    or a dotted suffix), and the model's linear layers' names to choose from. Builds the
    model on the meta device: no memory, no weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if type(module).__name__ in ("Linear", "Conv1D") and name != "lm_head"
        }
    )
    return unknown, linear


def load_lora(
    config: PretrainedConfig, state_dict: dict[str, torch.Tensor], lora: LoraConfig
) -> PeftModel:
    """A CPU copy of a LoRA run's model from its full state (base and adapters, with
    PeftModel's keys): its `save_pretrained` writes the adapter (`PeftModel.from_pretrained
    (base, dir)` loads it), its `merge_and_unload()` is the merged model."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(base, lora)
    peft_model.to_empty(device="cpu")
    missing, unexpected = peft_model.load_state_dict(state_dict, strict=False)  # keeps ties
    if missing or unexpected:
        raise RuntimeError(f"LoRA export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return peft_model.float().eval()


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts (ZeRO-3 partitions counted at full size)."""
    trainable = total = 0
    for param in model.parameters():
        size = getattr(param, "ds_numel", param.numel())
        total += size
        trainable += size if param.requires_grad else 0
    return trainable, total


def adapter_writer(peft_model: PeftModel, tokenizer: Any, grown_from: int | None) -> Any:
    """A function writing `peft_model`'s adapter and `tokenizer` into a directory.
    `grown_from`: the base model's vocabulary size when a chat template's tokens grew it;
    rows that did not train with the adapters are part of the model then, so the adapter
    carries the embeddings."""
    lora = peft_model.peft_config["default"]
    grown = grown_from is not None and peft_model.config.vocab_size > grown_from
    with_embeddings = grown and not lora.trainable_token_indices

    def write(out: str) -> None:
        peft_model.save_pretrained(
            out, safe_serialization=True, save_embedding_layers=with_embeddings
        )
        tokenizer.save_pretrained(out)

    return write


def base_vocab_size(pretrained: str | None) -> int | None:
    """The vocabulary size of a pretrained base model (None when trained from scratch)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(pretrained).vocab_size if pretrained else None
