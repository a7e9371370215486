"""Group-aware losses against hand-computed values (pure PyTorch, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from raygen.jobs.models.group_loss import (
    GroupDRO,
    group_sums,
    inverse_frequency_weights,
    target_groups,
    token_losses,
    weighted_mean_loss,
)


def test_token_losses_average_to_the_transformers_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    ids = torch.randint(0, 50, (3, 9))
    out = model(input_ids=ids, labels=ids)
    losses = token_losses(out.logits, ids)
    assert losses.shape == (3, 8)
    assert losses.mean().item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_a_loss_term_belongs_to_the_group_of_the_token_it_predicts():
    group_ids = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.int16)
    assert target_groups(group_ids).tolist() == [[0, 1, 1], [0, 0, 0]]


def test_group_sums_and_counts():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    groups = torch.tensor([[0, 2, 2], [0, 0, 2]])
    sums, counts = group_sums(losses, groups, 3)
    assert sums.tolist() == [10.0, 0.0, 11.0] and counts.tolist() == [3.0, 0.0, 3.0]
    sums[2].backward()  # differentiable: d(sum of group 2)/d(loss) is 1 on its terms
    assert losses.grad.tolist() == [[0, 1, 1], [0, 0, 1]]


def test_inverse_frequency_weights_give_every_group_the_same_total():
    weights = inverse_frequency_weights([30, 10, 0])
    # N = 40 tokens in G = 2 groups with tokens: w = N / (G n_g); an empty group gets 0.
    assert weights.tolist() == pytest.approx([40 / 60, 2.0, 0.0])
    assert (weights * torch.tensor([30.0, 10.0, 0.0])).sum() / 40 == pytest.approx(1.0)
    assert inverse_frequency_weights([7, 7]).tolist() == [1.0, 1.0]


def test_weighted_mean_is_the_mean_of_group_means_at_the_corpus_frequencies():
    losses = torch.tensor([[1.0, 1.0, 1.0, 3.0]])
    groups = torch.tensor([[0, 0, 0, 1]])
    weights = inverse_frequency_weights([3, 1])
    # (1 + 3) / 2, where the plain mean is 1.5
    assert weighted_mean_loss(losses, groups, weights).item() == pytest.approx(2.0)


def test_group_dro_moves_weight_to_the_worse_group():
    dro = GroupDRO(2, step_size=1.0)
    sums, counts = torch.tensor([2.0, 4.0]), torch.tensor([2.0, 2.0])  # means 1 and 2
    dro.update(sums, counts)
    e = math.e
    assert dro.q.tolist() == pytest.approx([1 / (1 + e), e / (1 + e)])
    assert dro.loss(sums, counts).item() == pytest.approx((1 + 2 * e) / (1 + e))


def test_group_dro_carries_an_absent_groups_loss_over():
    dro = GroupDRO(2, step_size=1.0)
    dro.update(torch.tensor([2.0, 4.0]), torch.tensor([2.0, 2.0]))
    # Group 1 is missing from this batch: its latest mean (2) still counts, so q keeps
    # moving towards it instead of towards the group that happened to be sampled.
    dro.update(torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0]))
    e = math.e
    assert dro.q.tolist() == pytest.approx([1 / (1 + e**2), e**2 / (1 + e**2)])
    # The loss leaves the absent group out.
    assert dro.loss(torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0])).item() == pytest.approx(
        1 / (1 + e**2)
    )


def test_group_dro_treats_a_group_not_seen_yet_as_average_and_restores_its_state():
    dro = GroupDRO(3, step_size=1.0, present=[True, True, False])
    assert dro.q.tolist() == [0.5, 0.5, 0.0]  # no training tokens: never weighted
    dro.update(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert dro.q.tolist() == pytest.approx([0.5, 0.5, 0.0])  # group 1 unseen: average
    restored = GroupDRO(3, step_size=1.0)
    restored.load_state(dro.state())
    assert restored.q.tolist() == dro.q.tolist()
    assert restored.latest[0].item() == 1.0 and math.isnan(restored.latest[1].item())
