"""TRIM-KV retention gates, their training-time attention bias and the capacity loss (docs/methods.md section 4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from tokensieve.selectors.kv_cache import check_memory_size


class RetentionGate(nn.Module):
    """log beta = logsigmoid(W2 act(W1 x + b1) + b) per kv head, from a layer's attention input x [B, T, D].

    The separate bias b starts large (`bias_init`), so beta ~ 1 (keep everything) before training; W1, W2 ~ N(0, 0.02).
    Returns log beta as [B, H_kv, T].
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, intermediate_size: int = 512, bias_init: float = 18.0,
                 act: str = "silu"):
        super().__init__()
        if act not in ACT2FN:
            raise ValueError(f"act must be an activation transformers knows (e.g. silu, gelu), got {act!r}")
        self.config = {"hidden_size": hidden_size, "num_kv_heads": num_kv_heads,
                       "intermediate_size": intermediate_size, "bias_init": bias_init, "act": act}
        self.up = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.act = ACT2FN[act]
        self.down = nn.Linear(intermediate_size, num_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.full((num_kv_heads,), float(bias_init)))
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)
        nn.init.normal_(self.down.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(self.up.weight.dtype)
        if type(self.up) is nn.Linear and type(self.down) is nn.Linear:
            # Functional calls: at decode the gate runs on a buffer of a few tokens, where the cost of calling
            # modules is most of its time. (A wrapped up/down, e.g. with LoRA adapters, goes through its module.)
            logits = F.linear(self.act(F.linear(x, self.up.weight, self.up.bias)), self.down.weight, self.bias)
        else:
            logits = self.down(self.act(self.up(x))) + self.bias
        return F.logsigmoid(logits.float()).transpose(1, 2)  # [B, H_kv, T]


def retention_bias(log_beta: torch.Tensor) -> torch.Tensor:
    """The additive attention bias of training: entry [t, i] = (t - i) * log beta_i for i <= t, -inf for i > t.

    softmax(q k / sqrt(d) + bias) is then proportional to beta_i^(t-i) exp(q_t k_i / sqrt(d)). [B, H, T] -> [B, H, T, T].
    """
    length = log_beta.shape[-1]
    positions = torch.arange(length, device=log_beta.device)
    age = (positions[:, None] - positions[None, :]).to(log_beta.dtype)  # [T, T], t - i
    bias = age * log_beta[..., None, :]
    return bias.masked_fill(age < 0, -math.inf)


def _retained_sum(log_beta: torch.Tensor, start: int, end: int, keys: torch.Tensor, step: int) -> torch.Tensor:
    """S_t = sum_{i <= t, i real} beta_i^(t - i) for the query positions t = start .. end - 1: [B, H, T] -> [B, H,
    end - start]. Only keys up to end - 1 enter (the later ones are in no row's past).

    Factored so that most of the work is a matrix product instead of one exponential per (t, i): the rows go in
    steps of `step`; for a step starting at s and t = s + r, the keys before s give
    sum_{i < s} beta_i^(s - i) * beta_i^r (a [steps, keys] x [keys, step] product of exponentials, `step` + steps
    exponentials per key instead of end - start), the keys inside the step the direct sum over a [step, step] block.
    """
    batch, heads = log_beta.shape[:2]
    rows = end - start
    count = -(-rows // step)  # steps in this range (the last may run past end: padded, dropped)
    device, dtype = log_beta.device, log_beta.dtype
    offsets = torch.arange(step, device=device, dtype=dtype)
    # Keys before each step's first row s: beta_i^(s - i) for i < s, then times beta_i^r for r = 0 .. step - 1.
    firsts = start + step * torch.arange(count, device=device)
    age = (firsts[:, None] - torch.arange(end, device=device)[None]).to(dtype)  # [steps, end]
    earlier = (age > 0) & keys[:, None, None, :end]  # [B, 1, steps, end]
    decayed = torch.exp(age.clamp(min=0) * log_beta[..., None, :end]).masked_fill(~earlier, 0.0)
    powers = torch.exp(offsets[:, None] * log_beta[..., None, :end])  # [B, H, step, end]
    before = decayed @ powers.transpose(-1, -2)  # [B, H, steps, step]
    # Keys inside the step: t - i = r - j for key j of the step.
    padding = count * step - rows
    inside = F.pad(log_beta[..., start:end], (0, padding)).view(batch, heads, count, step)
    real = F.pad(keys[:, start:end], (0, padding)).view(batch, 1, count, 1, step)
    lag = offsets[:, None] - offsets[None, :]  # [step (rows), step (keys)]
    terms = torch.exp(lag.clamp(min=0) * inside[..., None, :]).masked_fill(~((lag >= 0) & real), 0.0)
    return (before + terms.sum(dim=-1)).reshape(batch, heads, count * step)[..., :rows]


def capacity_loss(log_beta: torch.Tensor, memory_size: float, global_budget: bool = False,
                  chunk_size: int = 1024, valid: torch.Tensor | None = None) -> torch.Tensor:
    """TRIM-KV's capacity loss (see `capacity_terms`): the positive terms' sum over their count, 0 if none."""
    total, count = capacity_terms(log_beta, memory_size, global_budget, chunk_size, valid)
    return total / count.clamp(min=1)


def capacity_terms(log_beta: torch.Tensor, memory_size: float, global_budget: bool = False,
                   chunk_size: int = 1024, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t max(0, (S_t - M) / max(t - M, 1)), the number of positive terms): TRIM-KV's capacity loss is their ratio.

    Returned apart so a data-parallel trainer can divide by the count summed over ranks.

    log_beta: [B, H, T] (fold a layer axis into H). S_t = sum_{i <= t} beta_i^(t-i) per (batch, head), t 0-indexed.
    global_budget: compare the sum of S_t over all heads with M * H instead, divided by H (one budget of M * H
    slots that heads may trade between them).
    valid: optional [B, T] bool, the real tokens (padding neither counts as retained nor adds terms).
    Query rows are processed in chunks of `chunk_size` and recomputed in the backward pass; inside a chunk the sums
    are factored in steps of sqrt(chunk_size) rows (`_retained_sum`), so memory stays at [B, H, 2 sqrt(chunk), T]
    and a chunk costs about 2 sqrt(chunk) exponentials per key instead of chunk (never [T, T] per head, never
    float64).
    """
    check_memory_size(memory_size)
    if log_beta.dim() != 3:
        raise ValueError(f"log_beta must be [B, H, T], got shape {tuple(log_beta.shape)}")
    log_beta = log_beta.float()
    heads, length = log_beta.shape[1], log_beta.shape[2]
    if valid is None:
        valid = torch.ones(log_beta.shape[0], length, dtype=torch.bool, device=log_beta.device)
    valid = valid.bool()
    shared = heads if global_budget else 1  # heads that share one budget of M * shared slots
    total = log_beta.new_zeros(())
    count = log_beta.new_zeros(())
    step = max(1, math.isqrt(chunk_size))  # ~sqrt(chunk) exponentials per key and row step (see _retained_sum)
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        rows = torch.arange(start, end, device=log_beta.device)
        if log_beta.requires_grad:
            retained = checkpoint(_retained_sum, log_beta, start, end, valid, step, use_reentrant=False)
        else:
            retained = _retained_sum(log_beta, start, end, valid, step)  # [B, H, rows]
        if global_budget:
            retained = retained.sum(dim=1, keepdim=True)
        excess = (retained - memory_size * shared) / (shared * (rows.to(retained.dtype) - memory_size).clamp(min=1.0))
        positive = (excess > 0) & valid[:, None, rows]
        total = total + (excess * positive).sum()
        count = count + positive.sum()
    return total, count
