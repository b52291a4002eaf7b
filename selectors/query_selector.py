"""QTSplus-style query-aware token selection (docs/methods.md section 5), and training-free baselines.

QuerySelector scores N candidate tokens X [B, N, D] against the query tokens Q [B, L, D] with one cross-attention
layer (r_j = max over heads and query positions of the attention probability), predicts a keep ratio rho from
[mean Q; log N; max r; entropy of r], and keeps: in training a straight-through mask at the threshold solved for
rho * N kept tokens; at inference the hard top n = clamp(ceil(rho N), 1, n_max), in original order. With `pool` > 1
r is first averaged over that many neighbouring candidates (as PromptDistill smooths its scores), so a kept token
brings its neighbours: a code with the name written before it, not the code alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokensieve.selectors.topn import hard_top_n, solve_threshold, straight_through_mask


def standardize(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(r - mean) / std over each row's valid entries; 0 on padding."""
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (scores * mask).sum(-1, keepdim=True) / count
    var = (((scores - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    return ((scores - mean) / (var.sqrt() + 1e-6)).masked_fill(~mask, 0.0)


@dataclass
class Selection:
    """What a selector decided for a batch."""

    scores: torch.Tensor  # r [B, N] (averaged over the window when pool > 1), 0 on padding
    rho: torch.Tensor  # [B] predicted keep ratio (the fixed ratio when n is given)
    keep: torch.Tensor  # [B, N]: float 0/1 with straight-through gradient in training, bool at inference
    count: torch.Tensor  # [B] tokens kept


class QuerySelector(nn.Module):
    """Cross-attention scorer + budget head + straight-through / hard top-n (see the module docstring).

    hidden_size: width of the candidate and query features (after the optional projector);
    feature_size: width of external candidate features (e.g. vision-encoder outputs); a linear projector maps them
    to hidden_size. pool: odd window over which r is averaged before choosing (1: off; not in QTSplus).
    (There is no re-encoder: QTSplus re-encodes the kept tokens and feeds those to the LM, but here the LM reads the
    kept tokens themselves, so a re-encoder would only ever have fed the scorer.)
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, budget_hidden: int = 256, rho_min: float = 0.05,
                 rho_max: float = 0.5, n_max: int | None = None, tau: float = 0.1, gumbel: bool = True,
                 feature_size: int | None = None, running_mean_momentum: float = 0.99, pool: int = 1):
        super().__init__()
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"pool must be an odd window >= 1 (1: off), got {pool}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if not 0.0 < rho_min <= rho_max <= 1.0:
            raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got {rho_min}, {rho_max}")
        self.config = {"hidden_size": hidden_size, "num_heads": num_heads, "budget_hidden": budget_hidden,
                       "rho_min": rho_min, "rho_max": rho_max, "n_max": n_max, "tau": tau, "gumbel": gumbel,
                       "feature_size": feature_size,
                       "running_mean_momentum": running_mean_momentum, "pool": pool}
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.rho_min, self.rho_max, self.n_max, self.tau, self.gumbel = rho_min, rho_max, n_max, tau, gumbel
        self.momentum, self.pool = running_mean_momentum, pool
        self.projector = nn.Linear(feature_size, hidden_size) if feature_size else None
        self.query_norm = nn.LayerNorm(hidden_size)
        self.key_norm = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.budget = nn.Sequential(nn.Linear(hidden_size + 3, budget_hidden), nn.GELU(), nn.Linear(budget_hidden, 1))
        self.register_buffer("rho_running_mean", torch.tensor((rho_min + rho_max) / 2))

    def relevance(self, candidates, candidate_mask, query, query_mask) -> torch.Tensor:
        """r_j = max over heads h and query positions l of softmax_N(q_l k_j / sqrt(d_h)): [B, N] in [0, 1]."""
        batch, n, _ = candidates.shape
        q = self.q_proj(self.query_norm(query)).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(self.key_norm(candidates)).view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        logits = torch.einsum("bhld,bhnd->bhln", q, k) / math.sqrt(self.head_dim)
        probs = logits.masked_fill(~candidate_mask[:, None, None, :], -math.inf).softmax(dim=-1)
        probs = probs.masked_fill(~query_mask[:, None, :, None], 0.0)
        return probs.amax(dim=(1, 2)).masked_fill(~candidate_mask, 0.0)

    def keep_ratio(self, scores, candidate_mask, query, query_mask) -> torch.Tensor:
        """rho = rho_min + (rho_max - rho_min) * sigmoid(MLP([mean Q; log N; max r; entropy of r]))."""
        counts = candidate_mask.sum(-1).clamp(min=1).float()
        p = scores / scores.sum(-1, keepdim=True).clamp(min=1e-8)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)
        mean_query = (query * query_mask[..., None]).sum(1) / query_mask.sum(-1, keepdim=True).clamp(min=1)
        features = torch.cat([mean_query, counts.log()[:, None], scores.amax(-1)[:, None], entropy[:, None]], dim=-1)
        return self.rho_min + (self.rho_max - self.rho_min) * torch.sigmoid(self.budget(features).squeeze(-1))

    def forward(self, candidates, candidate_mask, query, query_mask, n: int | None = None,
                ratio: float | None = None) -> Selection:
        """Select among `candidates`; `n` or `ratio` fix the budget instead of the learned rho."""
        candidate_mask, query_mask = candidate_mask.bool(), query_mask.bool()
        hidden, features = self.config["hidden_size"], self.config["feature_size"]
        if candidates.shape[-1] != (features or hidden):
            expected = f"feature_size {features} (its projector's input)" if features else f"hidden_size {hidden}"
            raise ValueError(f"candidate features have width {candidates.shape[-1]}; this selector expects {expected}")
        if query.shape[-1] != hidden:
            raise ValueError(f"query features have width {query.shape[-1]}; this selector expects hidden_size {hidden}")
        x = self.projector(candidates) if self.projector is not None else candidates
        scores = smooth(self.relevance(x, candidate_mask, query, query_mask), candidate_mask, self.pool)
        counts = candidate_mask.sum(-1).float()
        if n is not None or ratio is not None:
            target = torch.full_like(counts, float(n)) if n is not None else ratio * counts
            rho = target / counts.clamp(min=1)
        else:
            rho = self.keep_ratio(scores, candidate_mask, query, query_mask)
            target = rho * counts
        if self.n_max is not None:
            target = target.clamp(max=self.n_max)
        if self.training:
            # r is a probability with a row-dependent spread (often all < 0.05): the threshold is solved on the
            # row-standardised scores, so tau means the same sharpness in every row (same order, same top-n).
            standard = standardize(scores, candidate_mask)
            threshold = solve_threshold(standard, target, self.tau, mask=candidate_mask)
            keep = straight_through_mask(standard, threshold, self.tau, self.gumbel, candidate_mask)
            with torch.no_grad():
                self.rho_running_mean.lerp_(rho.detach().mean(), 1 - self.momentum)
            count = keep.detach().sum(-1)
        else:
            count = torch.ceil(target.detach() - 1e-6).clamp(min=1)
            keep = hard_top_n(scores, count, candidate_mask)
            count = keep.sum(-1).float()
        return Selection(scores=scores, rho=rho, keep=keep, count=count)

    def budget_terms(self, selection: Selection, candidate_mask, lambda_t: float = 1.0, lambda_m: float = 1.7,
                     lambda_s: float = 0.05) -> dict[str, torch.Tensor]:
        """QTSplus budget regularisers, batch means: lambda_t (rho N)^2 / n_max^2, lambda_m rho N / n_max,
        lambda_s (rho - running mean)^2. n_max defaults to each row's N."""
        counts = candidate_mask.sum(-1).float().clamp(min=1)
        n_max = torch.full_like(counts, float(self.n_max)) if self.n_max is not None else counts
        expected = selection.rho * counts
        return {
            "budget_square": lambda_t * (expected**2 / n_max**2).mean(),
            "budget_linear": lambda_m * (expected / n_max).mean(),
            "budget_stability": lambda_s * ((selection.rho - self.rho_running_mean) ** 2).mean(),
        }


def smooth(scores: torch.Tensor, mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each valid entry of scores [B, N] replaced by the mean of the valid entries within kernel // 2 of it (padding
    neither counted nor changed: 0 there); kernel 1 returns scores unchanged."""
    if kernel == 1:
        return scores
    mask = mask.bool()
    values = scores.masked_fill(~mask, 0.0)[:, None]
    total = F.avg_pool1d(values, kernel, stride=1, padding=kernel // 2, count_include_pad=True)[:, 0]
    count = F.avg_pool1d(mask[:, None].to(values.dtype), kernel, stride=1, padding=kernel // 2,
                         count_include_pad=True)[:, 0]
    return (total / count.clamp(min=1e-12)).masked_fill(~mask, 0.0)


# --- training-free baselines, same output ---------------------------------------------------------------------------


def promptdistill_scores(q_last: torch.Tensor, keys: torch.Tensor, candidate_mask: torch.Tensor,
                         kernel: int = 5) -> torch.Tensor:
    """PromptDistill-style relevance: head-mean of q_last . k_j / sqrt(d) at one layer, smoothed by an average pool.

    q_last [B, H, d] (the last prompt token's query), keys [B, H, N, d] (the candidates' keys, grouped heads
    repeated), candidate_mask [B, N]. Returns [B, N], -inf on padding.
    """
    logits = torch.einsum("bhd,bhnd->bhn", q_last.float(), keys.float()) / math.sqrt(keys.shape[-1])
    return smooth(logits.mean(dim=1), candidate_mask, kernel).masked_fill(~candidate_mask.bool(), -math.inf)


def position_scores(candidate_mask: torch.Tensor, how: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scores that make top-n keep the first n ("first"), the last n ("last") or a random n ("random") tokens."""
    n = candidate_mask.shape[-1]
    index = torch.arange(n, device=candidate_mask.device, dtype=torch.float).expand(candidate_mask.shape)
    if how == "first":
        score = -index
    elif how == "last":
        score = index.clone()
    elif how == "random":
        score = torch.rand(candidate_mask.shape, generator=generator).to(candidate_mask.device)
    else:
        raise ValueError(f"how must be first, last or random, got {how!r}")
    return score.masked_fill(~candidate_mask.bool(), -math.inf)
