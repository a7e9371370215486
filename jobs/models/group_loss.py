"""Group-aware language-model losses (pure PyTorch): per-token losses, per-group sums,
inverse-frequency weights and the group-DRO weights of the worst-group objective.

Groups are per token: a packed sequence joins several documents, each token carries the
group of the document it belongs to. Position t predicts token t+1, so a loss term belongs
to the group of the token it predicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting each next token: (B, T, V), (B, T) -> (B, T-1) float32.

    Its mean is the loss transformers computes with `labels=input_ids`.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return losses.view(targets.shape)


def target_groups(group_ids: torch.Tensor) -> torch.Tensor:
    """The group of each loss term of `token_losses`: (B, T) -> (B, T-1) int64."""
    return group_ids[:, 1:].long()


def group_sums(
    losses: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (sum of losses, number of terms), each (num_groups,) float64.

    Differentiable in the sums. Counts are floats so both can be all-reduced together.
    """
    flat = groups.reshape(-1).to(losses.device)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=losses.device)
    sums = sums.index_add(0, flat, losses.reshape(-1).double())
    counts = torch.bincount(flat, minlength=num_groups).double()
    return sums, counts


def inverse_frequency_weights(token_counts: list[int] | torch.Tensor) -> torch.Tensor:
    """Per-group weights w_g = N / (G * n_g) (G: groups with tokens, N: all their tokens).

    Under these weights every group adds the same total to the loss, and a token-weighted
    mean of the weights is 1, so the loss keeps its scale (a corpus of equal groups gets
    all-ones). Groups without training tokens get weight 0.
    """
    counts = torch.as_tensor(token_counts, dtype=torch.float64)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def weighted_mean_loss(
    losses: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Mean over all terms of weight(group) x loss: an unbiased estimate of the mean of the
    per-group mean losses when `weights` are the inverse frequencies."""
    weights = weights.to(losses.device, losses.dtype)
    return (weights[groups.to(losses.device)] * losses).mean()


class GroupDRO:
    """Online group DRO (Sagawa et al., 2020): minimize the worst group's expected loss.

    Keeps a distribution q over groups. Each step multiplies q_g by exp(step_size * L_g),
    L_g the group's latest mean loss, and renormalizes; the loss is sum_g q_g L_g, so the
    groups doing worst are up-weighted, more so the longer they stay worst.

    A small batch often lacks a rare group. Its latest loss is then carried over (groups
    not seen yet count as average): treating an absent group's loss as 0 would shrink its
    weight at every batch it misses, starving exactly the rare groups this is for.
    """

    def __init__(self, num_groups: int, step_size: float, present: list[bool] | None = None):
        mask = torch.ones(num_groups, dtype=torch.float64)
        if present is not None:
            mask = torch.as_tensor(present, dtype=torch.float64)
        self.q = mask / mask.sum()
        self.step_size = step_size
        self.latest = torch.full((num_groups,), float("nan"), dtype=torch.float64)

    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Move q towards the groups with high mean loss (`sums`/`counts`, detached)."""
        sums, counts = sums.detach().cpu().double(), counts.detach().cpu().double()
        seen = counts > 0
        self.latest[seen] = sums[seen] / counts[seen]
        known = ~self.latest.isnan()
        if not known.any():
            return
        losses = torch.where(known, self.latest, self.latest[known].mean())
        # Shifting by the max changes nothing after normalization; it keeps exp finite.
        q = self.q * torch.exp(self.step_size * (losses - losses.max()))
        self.q = q / q.sum()

    def loss(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """sum_g q_g * sums_g / counts_g, with groups absent from the batch left out."""
        q = self.q.to(sums.device)
        return (q * sums / counts.clamp(min=1)).sum()

    def state(self) -> dict[str, list[float]]:
        return {"q": self.q.tolist(), "latest": self.latest.tolist()}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self.q = torch.tensor(state["q"], dtype=torch.float64)
        self.latest = torch.tensor(state["latest"], dtype=torch.float64)
