"""The causal-LM training loop that runs on every Ray Train worker."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from raygen.cluster.publish import publish_dir
from raygen.cluster.storage import join, local_copy
from raygen.jobs.data.chat import set_generation_ends
from raygen.jobs.models.causal_lm import build_config, build_trainable_lm, largest_parameter
from raygen.jobs.models.group_loss import (
    GroupDRO,
    group_sums,
    inverse_frequency_weights,
    target_groups,
    token_losses,
    weighted_mean_loss,
)
from raygen.jobs.models.lora import adapter_writer, base_vocab_size, load_lora
from raygen.jobs.run_dir import ADAPTER_DIR, ADAPTER_KIND, MODEL_DIR, MODEL_KIND
from raygen.jobs.spec import TrainSpec, global_batch_size
from raygen.jobs.train import metrics as m
from raygen.jobs.train.checkpoint import save_and_report
from raygen.jobs.train.deepspeed_config import derive_deepspeed_config
from raygen.jobs.train.worker import (
    PreemptionWatch,
    TrainWindow,
    build_optimizer,
    checkpoint_cadence,
    lr_lambda,
    micro_batches,
    resume,
    start_worker,
    trains_new_token_rows,
)

logger = logging.getLogger(__name__)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train `config["spec"]` with DeepSpeed on this worker; rank 0 logs and exports."""
    import ray.train
    from transformers import AutoTokenizer

    spec, rank, world = start_worker(config)
    run_dir, prepared = config["run_dir"], config["prepared"]
    tokenizer = AutoTokenizer.from_pretrained(local_copy(prepared["tokenizer"]))
    engine, scheduler, zero3 = build_engine(spec, len(tokenizer), tokenizer.eos_token_id, world)
    set_generation_ends(engine.module, tokenizer)

    start_step, client_state, _, log = resume(engine, [scheduler], spec, config, rank)

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    micro_per_epoch = prepared["train_sequences"] // world // spec.train.micro_batch_size
    batches = micro_batches(spec, train_shard, micro_per_epoch, start_step * spec.train.grad_accum)
    eval_batches = min(
        spec.train.eval_batches,
        prepared["eval_sequences"] // spec.train.micro_batch_size // world,
    )
    tokens_per_step = global_batch_size(spec, world) * spec.data.seq_len
    device = engine.device
    groups = prepared.get("groups")
    objective = GroupObjective(spec, groups, world, client_state.get(DRO_STATE)) if groups else None
    # Chat data: each sequence says which tokens the loss counts (`targets`).
    masked = prepared.get("format") == "chat"

    def evaluate() -> dict[str, float]:
        engine.eval()
        # (sum of batch losses, batches), on the device the collective backend expects
        total = torch.zeros(2, dtype=torch.float64, device=device)
        # with groups: (sum of token losses, tokens) per group
        by_group = torch.zeros(2, len(groups["names"]) if groups else 0, dtype=torch.float64)
        by_group = by_group.to(device)
        with torch.no_grad():
            # Every rank runs the same number of forwards (ZeRO-3 gathers per forward).
            for i, batch in enumerate(
                eval_shard.iter_torch_batches(
                    batch_size=spec.train.micro_batch_size, drop_last=True, device=device
                )
            ):
                if i >= eval_batches * world:
                    break
                if i % world != rank:
                    continue
                ids = batch["input_ids"].long()
                if masked:
                    summed, counted = masked_loss(engine, batch)
                    total += torch.stack([summed.double(), counted.double()])
                    continue
                if groups:
                    losses = token_losses(engine(input_ids=ids).logits, ids)
                    sums, counts = group_sums(
                        losses, target_groups(batch["group_ids"]), len(groups["names"])
                    )
                    by_group += torch.stack([sums, counts])
                    total[0] += losses.mean().double()
                else:
                    total[0] += engine(input_ids=ids, labels=ids).loss.double()
                total[1] += 1
        dist.all_reduce(total)
        engine.train()
        loss = (total[0] / total[1].clamp(min=1)).item()
        out = {m.EVAL_LOSS: loss, m.PERPLEXITY: m.perplexity(loss)}
        if groups:
            dist.all_reduce(by_group)
            out.update(group_eval_losses(groups["names"], by_group[0], by_group[1]))
        return out

    last_metrics: dict[str, Any] = {}

    def save(step: int, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint every rank's shard (and report it to Ray Train) at `step`."""
        state = {"step": step, **(objective.state() if objective else {})}
        save_and_report(engine, step, {**last_metrics, **(extra or {})}, state)
        if log:
            log.sync()

    engine.train()
    step = start_step
    watch = PreemptionWatch(device)
    window = TrainWindow(spec, world, device, tokens_per_step)
    while step < spec.train.max_steps:
        micro = [next(batches) for _ in range(spec.train.grad_accum)]
        if masked:
            masked_step(engine, micro, world, window)
        else:
            plain_step(engine, micro, objective, window)
        step += 1

        is_last = step == spec.train.max_steps
        row = window.end_step(step, scheduler.get_last_lr()[0], is_last)
        if step % spec.train.eval_every == 0 or is_last:
            row = {m.STEP: step, **row, **evaluate()}
        if row and log:
            log.log(row)
        last_metrics.update(row)
        if row:
            window.reset()
        if checkpoint_cadence(step, is_last, spec, save, watch, run_dir, rank, config.get("gate")):
            window.restart_clock()  # checkpoint time is not step time

    export_model(engine, tokenizer, run_dir, rank, spec)
    if log:
        log.close()
    del zero3


DRO_STATE = "group_dro"


def plain_step(engine: Any, micro: list[dict[str, Any]], objective: Any, window: Any) -> None:
    """One optimizer step on packed text: each micro-batch's mean token loss (or the group
    objective's), DeepSpeed accumulating over the micro-batches."""
    for batch in micro:
        ids = batch["input_ids"].long()  # (B, T)
        if objective:
            losses = token_losses(engine(input_ids=ids).logits, ids)  # (B, T-1)
            loss = objective(losses, target_groups(batch["group_ids"]))
            plain = losses.mean()  # logged: comparable with and without weighting
        else:
            loss = plain = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()  # DeepSpeed only updates at the accumulation boundary
        window.add(plain)


def masked_loss(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, tokens counted) of a micro-batch of chat sequences: the loss of
    predicting each token marked in `targets` (an assistant's, under loss_on assistant)."""
    ids = batch["input_ids"].long()
    losses = token_losses(engine(input_ids=ids).logits, ids)  # (B, T-1): predicting ids[:, 1:]
    mask = batch["targets"][:, 1:].to(losses.dtype)
    return (losses * mask).sum(), mask.sum()


def masked_step(engine: Any, micro: list[dict[str, Any]], world: int, window: Any) -> None:
    """One optimizer step on chat sequences: the gradient of the mean loss over every
    counted token of the step, on all ranks (micro-batches with more counted tokens weigh
    more). DeepSpeed divides each backward by the accumulation steps and averages ranks'
    gradients: each micro-batch's summed loss is scaled back by both."""
    counted = torch.stack([b["targets"][:, 1:].sum() for b in micro]).sum()
    total = counted.double().to(engine.device)
    dist.all_reduce(total)
    scale = len(micro) * world / total.clamp(min=1)
    for batch in micro:
        summed, tokens = masked_loss(engine, batch)
        engine.backward(summed * scale.to(summed.dtype))
        engine.step()
        window.add(summed, tokens)


def build_engine(spec: TrainSpec, vocab_size: int, eos_token_id: int, world: int) -> tuple:
    """The model wrapped in its DeepSpeed engine, with raygen's optimizer and LR schedule.

    Returns (engine, scheduler, zero3): under ZeRO-3, `zero3` is the transformers hook that
    must stay alive while the engine is used (it gathers partitioned weights on export).
    """
    import deepspeed

    model_config = build_config(spec.model, vocab_size, spec.data.seq_len, eos_token_id)
    ds_config = derive_deepspeed_config(spec, world, largest_parameter(model_config))
    zero3 = None
    if spec.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, transformers builds (and loads pretrained weights) under
        # deepspeed.zero.Init: parameters are partitioned as they are created, so no rank
        # ever holds the full model.
        zero3 = HfDeepSpeedConfig(ds_config)
    model = build_trainable_lm(spec.model, model_config, vocab_size, trains_new_token_rows(spec))
    # The schedule is built on DeepSpeed's wrapped optimizer (ZeRO regroups parameters).
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(spec, model),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec)),
        config=ds_config,
    )
    return engine, scheduler, zero3


class GroupObjective:
    """The training loss of a run with `train.group_weighting`, from per-token losses.

    Every rank holds the same state: the group-DRO mix is updated from group losses summed
    over all ranks, and saved with each checkpoint.
    """

    def __init__(self, spec: TrainSpec, groups: dict[str, Any], world: int, dro_state: Any):
        weighting = spec.train.group_weighting
        counts = [groups["train_tokens"][name] for name in groups["names"]]
        self.method, self.world, self.num_groups = weighting.method, world, len(counts)
        self.weights = inverse_frequency_weights(counts)
        self.dro = GroupDRO(len(counts), weighting.step_size, present=[c > 0 for c in counts])
        if dro_state is not None:
            self.dro.load_state(dro_state)

    def __call__(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: (B, T-1) token losses and their groups -> scalar."""
        if self.method == "none":
            return losses.mean()
        if self.method == "inverse_frequency":
            return weighted_mean_loss(losses, groups, self.weights)
        sums, counts = group_sums(losses, groups, self.num_groups)
        totals = torch.stack([sums.detach(), counts])
        dist.all_reduce(totals)
        self.dro.update(totals[0], totals[1])
        # DeepSpeed averages gradients over ranks: x world makes the sum of every rank's
        # share the gradient of q . (global group means).
        return (self.dro.loss(sums, totals[1]) * self.world).float()

    def state(self) -> dict[str, Any]:
        return {DRO_STATE: self.dro.state()} if self.method == "worst_group" else {}


def group_eval_losses(
    names: list[str], sums: torch.Tensor, counts: torch.Tensor
) -> dict[str, float]:
    """`eval_loss/<group>` for each group with eval tokens, and the worst of them."""
    out = {
        m.GROUP_EVAL_LOSS_PREFIX + name: (total / n).item()
        for name, total, n in zip(names, sums, counts, strict=True)
        if n > 0
    }
    if out:
        out[m.WORST_GROUP_EVAL_LOSS] = max(out.values())
    return out


def export_model(engine: Any, tokenizer: Any, run_dir: str, rank: int, spec: TrainSpec) -> None:
    """Save the consolidated weights and tokenizer to `<run>/model` (safetensors); with
    LoRA the merged model there, and the PEFT adapter (with the tokenizer) in `<run>/adapter`.

    All ranks must call this: with ZeRO-3 the weights are gathered from every partition.
    """
    zero3 = spec.deepspeed.zero_stage == 3
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if rank != 0:
        return
    model = engine.module
    if spec.model.lora:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # the CPU copy is built whole, not partitioned
        lora = model.peft_config["default"]
        generation = model.generation_config  # where generation ends (a chat's end of turn)
        peft = load_lora(model.config, state_dict or model.state_dict(), lora)
        write_adapter = adapter_writer(peft, tokenizer, base_vocab_size(spec.model.pretrained))
        publish_dir(join(run_dir, ADAPTER_DIR), ADAPTER_KIND, write_adapter, key="run.storage")
        model, state_dict = peft.merge_and_unload(), None
        model.generation_config = generation

    def write(out: str) -> None:
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)

    publish_dir(join(run_dir, MODEL_DIR), MODEL_KIND, write, key="run.storage")
