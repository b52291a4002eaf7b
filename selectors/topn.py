"""Differentiable top-n: a threshold solved for a target count, straight-through masks, hard top-n (docs/methods.md s.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def solve_threshold(scores: torch.Tensor, target_count: torch.Tensor, tau: float, iters: int = 10,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the t with sum_j sigmoid((r_j - t) / tau) = target_count, by Newton's method from the median.

    scores [B, N]; target_count [B] (or a number), differentiable: the iterations are plain tensor ops, so the
    gradient reaches target_count (and the scores). mask [B, N] bool leaves padding out of the sum. Returns t [B].
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    target = torch.as_tensor(target_count, dtype=scores.dtype, device=scores.device).expand(scores.shape[0])
    # The median of each row's valid scores: padding sorts to the end.
    ordered = scores.masked_fill(~valid, float("inf")).sort(dim=-1).values
    middle = ((valid.sum(-1) - 1).clamp(min=0) // 2)[:, None]
    t = ordered.gather(-1, middle).squeeze(-1).detach()
    for _ in range(iters):
        s = torch.sigmoid((scores - t[:, None]) / tau) * valid
        f = s.sum(-1) - target
        slope = -(s * (1 - s)).sum(-1) / tau  # d f / d t < 0
        t = t - f / slope.clamp(max=-1e-6)
    return t


def straight_through_mask(scores: torch.Tensor, threshold: torch.Tensor, tau: float, gumbel: bool = True,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """A 0/1 keep mask in the forward pass with the gradient of a soft one.

    gumbel: hard Gumbel-softmax over the logits [(r - t) / tau, 0] at temperature 1 (sampling noise explores): token j
    is kept with probability sigmoid((r_j - t) / tau), the very terms `solve_threshold` makes sum to the target, so
    the expected kept count is the target for every tau. (Gumbel over [r - t, 0] at temperature tau would keep with
    probability sigmoid(r - t) whatever tau is: far more than the target for tau < 1.) Else plain STE of
    sigmoid((r - t) / tau) > 0.5. At least one valid token per row is kept (the highest-scoring one).
    """
    margin = scores - threshold[:, None]
    if gumbel:
        logits = torch.stack([margin / tau, torch.zeros_like(margin)], dim=-1)
        keep = F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 0]
    else:
        soft = torch.sigmoid(margin / tau)
        keep = (soft > 0.5).to(soft.dtype) + soft - soft.detach()
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    keep = keep * valid
    best = scores.masked_fill(~valid, -float("inf")).argmax(-1)
    empty = (keep.detach() > 0.5).sum(-1) == 0
    forced = F.one_hot(best, scores.shape[-1]).to(keep.dtype) * empty[:, None]
    return keep + forced * (1 - keep.detach())


def hard_top_n(scores: torch.Tensor, n: torch.Tensor | int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A bool [B, N] mask of the n[b] highest-scoring valid tokens of each row (>= 1 when the row has any)."""
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    n = torch.as_tensor(n, device=scores.device).expand(scores.shape[0]).long()
    n = torch.minimum(n.clamp(min=1), valid.sum(-1))
    order = scores.float().masked_fill(~valid, -float("inf")).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < n[:, None]) & valid


def kept_indices(keep: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the indices of kept tokens in their original order."""
    return [row.nonzero().squeeze(-1) for row in keep.bool()]
