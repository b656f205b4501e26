"""Label-free losses of trained adapters, as pure functions on tensors.

An adapter between two encoders has no classifier and often no labels: what it has is, for every paired item,
the true embedding of the other space. So the per-item error is a distance to that embedding, and FastFill's
uncertainty head learns to predict it exactly as it learns the MSE + cross-entropy error with labels
(:func:`raybackfill.compat.losses.fastfill_loss`): the backfill order by uncertainty then works without labels.
The target is frozen (detached inside the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raybackfill.types import AdapterLoss, parse


def item_loss(h: torch.Tensor, target: torch.Tensor, kind: AdapterLoss | str = AdapterLoss.MSE_COSINE) -> torch.Tensor:
    """Per-item error, shape (N,): ``mse``: ``mean_d (t_id - h_id)^2``; ``cosine``: ``1 - cos(h_i, t_i)``;
    ``mse_cosine``: their sum.

    Examples:
        >>> h, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> item_loss(h, t, "mse").tolist(), item_loss(h, t, "cosine").tolist(), item_loss(h, t).tolist()
        ([1.0], [1.0], [2.0])
    """
    kind = parse(AdapterLoss, kind, what="adapter loss")
    target = target.detach()
    if h.shape != target.shape:
        raise ValueError(f"adapter output {tuple(h.shape)} and target {tuple(target.shape)} differ")
    total = h.new_zeros(h.shape[0])
    if kind in (AdapterLoss.MSE, AdapterLoss.MSE_COSINE):
        total = total + ((target - h) ** 2).mean(1)
    if kind in (AdapterLoss.COSINE, AdapterLoss.MSE_COSINE):
        total = total + (1.0 - F.cosine_similarity(h, target, dim=1, eps=1e-8))
    return total


def adapter_loss(
    h: torch.Tensor, target: torch.Tensor, kind: AdapterLoss | str = AdapterLoss.MSE_COSINE
) -> torch.Tensor:
    """The mean of :func:`item_loss` over the batch."""
    return item_loss(h, target, kind).mean()


def uncertainty_loss(
    h: torch.Tensor, s: torch.Tensor, target: torch.Tensor, kind: AdapterLoss | str = AdapterLoss.MSE_COSINE
) -> torch.Tensor:
    """FastFill's uncertainty-weighted loss on the label-free error: ``mean_i [0.5 exp(-s_i) L_i + 0.5 s_i]`` with
    ``L_i`` = :func:`item_loss`. Minimised over s_i at ``s_i = log L_i``: the head learns each item's log-error.

    Examples:
        >>> h, t = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
        >>> round(float(uncertainty_loss(h, torch.zeros(1), t, "mse")), 6)  # L = 1, s = 0: 0.5 * 1 + 0
        0.5
    """
    per_item = item_loss(h, target, kind)
    s = s.reshape(-1)
    return (0.5 * torch.exp(-s) * per_item + 0.5 * s).mean()
