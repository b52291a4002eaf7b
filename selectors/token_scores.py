"""Per-token scores and selections for token-level losses: ssToken, Rho-1, PRIOR (docs/methods.md sections 1-3).

Every function takes [B, T] tensors aligned with the labels they score (one entry per predicted token) and a
boolean mask of the tokens that may be scored (the response tokens, label != -100). Nothing here knows about
Trainer, datasets or files.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from tokensieve.upstream import fused_head_labelled_positions_only, modeling_function

EPS = 1e-8


def _check_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a [B, T] bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(mask.shape)} like the mask")


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def minmax_per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min + eps) over each row's masked entries; 0 outside the mask."""
    big = torch.finfo(values.dtype).max
    low = values.masked_fill(~mask, big).amin(dim=1, keepdim=True)
    high = values.masked_fill(~mask, -big).amax(dim=1, keepdim=True)
    scaled = (values - low) / (high - low + EPS)
    return scaled.masked_fill(~mask, 0.0)


def top_k_per_row(scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the `k[b]` highest-scoring masked entries of each row b (ties broken by position)."""
    ranked = scores.float().masked_fill(~mask, -math.inf)
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < k.unsqueeze(1)) & mask


def share_count(ratio: float, n):
    """ceil(ratio * n): how many of n tokens a selection at `ratio` keeps (n an int, or an integer tensor of counts).
    Every selection and the loss normaliser computed from the mask alone go through here, so they always agree."""
    if isinstance(n, torch.Tensor):
        return torch.ceil(ratio * n.double()).long()
    return math.ceil(ratio * n)


def random_scores(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores, one per token: a top-share selection by them is the random control of any scorer."""
    return torch.rand(mask.shape, generator=generator).to(mask.device)


def top_fraction(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the top ceil(ratio * n) masked entries of the whole batch (flattened)."""
    k = share_count(ratio, int(mask.sum()))
    flat = top_k_per_row(scores.reshape(1, -1), mask.reshape(1, -1), torch.tensor([k], device=scores.device))
    return flat.view_as(mask)


def select_top_share(scores: torch.Tensor, mask: torch.Tensor, ratio: float, level: str = "sample") -> torch.Tensor:
    """Keep the top ceil(ratio * n_b) masked entries of each row b (`level="sample"`), or the top ceil(ratio * N) of
    the whole batch (`level="batch"`). Returns a bool [B, T] subset of `mask`."""
    _check_ratio("ratio", ratio)
    if level == "batch":
        return top_fraction(scores, mask, ratio)
    if level != "sample":
        raise ValueError(f"level must be 'sample' or 'batch', got {level!r}")
    return top_k_per_row(scores, mask, share_count(ratio, mask.sum(dim=1)))


def kept_count(mask: torch.Tensor, ratio: float, level: str = "sample") -> int:
    """How many tokens a selection at `ratio` keeps: sum of ceil(ratio * n_b) per row, or ceil(ratio * N) per batch.

    Known from the mask alone, so the loss normaliser of a global batch is known before any forward.
    """
    if level == "sample":
        return int(share_count(ratio, mask.sum(dim=1)).sum())
    if level == "batch":
        return share_count(ratio, int(mask.sum()))
    raise ValueError(f"level must be 'sample' or 'batch', got {level!r}")


def sstoken_score(history_loss, current_loss, attn_to_prompt, response_mask, gamma: float = 0.5) -> torch.Tensor:
    """ssToken's per-token score: gamma * minmax(REL) + (1 - gamma) * attention, REL = history - current loss.

    Min-max runs over each sample's response tokens (eps 1e-8); 0 outside the response.
    """
    _check_shapes(response_mask, history_loss=history_loss, current_loss=current_loss, attn_to_prompt=attn_to_prompt)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    rel = minmax_per_row((history_loss - current_loss).float(), response_mask)
    score = gamma * rel + (1.0 - gamma) * attn_to_prompt.float()
    return score.masked_fill(~response_mask, 0.0)


def sstoken_select(
    history_loss: torch.Tensor,
    current_loss: torch.Tensor,
    attn_to_prompt: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 0.5,
    rho: float = 0.6,
    level: str = "sample",
) -> torch.Tensor:
    """ssToken selection (docs/methods.md section 1): the top ceil(rho * n_resp) response tokens of each sample by
    gamma * minmax(L_his - L_cur) + (1 - gamma) * A. `level="batch"` ranks the same scores over the whole batch.

    Returns a bool [B, T] subset of `response_mask`.
    """
    _check_ratio("rho", rho)
    score = sstoken_score(history_loss, current_loss, attn_to_prompt, response_mask, gamma)
    return select_top_share(score, response_mask, rho, level)


def excess_loss_select(current_loss, reference_loss, mask, ratio: float) -> torch.Tensor:
    """Rho-1 selective language modelling (docs/methods.md section 2): keep the top ceil(ratio * N) tokens of the batch
    by excess loss L_cur - L_ref, N the number of masked tokens in the batch."""
    _check_shapes(mask, current_loss=current_loss, reference_loss=reference_loss)
    _check_ratio("ratio", ratio)
    return top_fraction((current_loss - reference_loss).float(), mask, ratio)


def prior_weights(reference_logprobs, mask, alpha: float = 1.0) -> torch.Tensor:
    """PRIOR token weights (docs/methods.md section 3): w_i = (1 - p_ref(t_i))^alpha, scaled to mean 1 over each
    sequence's masked tokens, 0 outside the mask. A sequence whose tokens the reference predicts with certainty
    (all raw weights 0) gets uniform weights."""
    _check_shapes(mask, reference_logprobs=reference_logprobs)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    p = reference_logprobs.detach().float().exp().clamp(0.0, 1.0)
    raw = ((1.0 - p) ** alpha).masked_fill(~mask, 0.0)
    count = mask.sum(dim=1, keepdim=True).float()
    total = raw.sum(dim=1, keepdim=True)
    uniform = mask.float()
    weights = torch.where(total > EPS, raw * count / total.clamp(min=EPS), uniform)
    return weights.masked_fill(~mask, 0.0)


def dft_weights(logprobs, mask) -> torch.Tensor:
    """Dynamic fine-tuning weights w_i = p_i, detached (no gradient through the weight)."""
    _check_shapes(mask, logprobs=logprobs)
    return logprobs.detach().float().exp().masked_fill(~mask, 0.0)


def attention_per_label(attention: torch.Tensor, row: str = "own") -> torch.Tensor:
    """Per-position attention-to-prompt [B, T] -> one score per label position [B, T-1] (label position t is token
    t + 1): `own` takes token t + 1's own attention row (the authors' ssToken code), `predicting` row t, the position
    whose output predicts token t + 1 (under which the first response token always scores 1: its predicting row is
    the last prompt token, which attends only to the prompt)."""
    if row == "own":
        return attention[:, 1:]
    if row == "predicting":
        return attention[:, :-1]
    raise ValueError(f"row must be 'own' or 'predicting', got {row!r}")


# --- attention to the prompt: one layer, recomputed ---------------------------------------------------------------


@contextmanager
def capture_attention_inputs(attention: nn.Module):
    """Record what `attention` (a decoder layer's self-attention module, or a decoder layer: both take the hidden
    states first) receives during a forward.

    Yields a dict that holds `hidden_states` and `position_embeddings` after each call; the forward itself
    is untouched (any attention kernel, no attention maps requested).
    """
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["position_embeddings"] = kwargs.get("position_embeddings")
        if captured["position_embeddings"] is None and len(args) > 1:
            captured["position_embeddings"] = args[1]

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _rotary(attention: nn.Module):
    """The `apply_rotary_pos_emb` of the attention module's own modelling file, so RoPE is applied as the model does."""
    return modeling_function(attention, "apply_rotary_pos_emb")


def rotary_queries_keys(attention: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> tuple:
    """One layer's queries [B, H, T, d] and keys (grouped heads repeated) [B, H, T, d] as the model computes them:
    q/k projections, q/k norms where the model has them (Qwen3), RoPE from the model's own modelling file."""
    batch, length, _ = hidden_states.shape
    shape = (batch, length, -1, attention.head_dim)
    q = attention.q_proj(hidden_states).view(shape)
    k = attention.k_proj(hidden_states).view(shape)
    if hasattr(attention, "q_norm"):
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _rotary(attention)(q, k, cos, sin)
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


@torch.no_grad()
def attention_to_prompt(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    prompt_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sink_tokens: int = 0,
    chunk_size: int = 256,
    first_row: int = 0,
) -> torch.Tensor:
    """ssToken's semantic score A_t = (1/H) sum_h sum_{j in prompt} softmax(q_t k^T / sqrt(d) + causal)_j.

    Recomputes one layer's attention probabilities from the inputs its attention module received (see
    `capture_attention_inputs`): q/k projections, q/k norms where the model has them, RoPE as the model applies it,
    grouped kv heads repeated. Query rows go in chunks of `chunk_size`, so memory is [B, H, chunk, T].

    prompt_mask: [B, T] bool, the prompt tokens (keys whose attention mass is summed).
    attention_mask: optional [B, T] 0/1, the real (non-padding) tokens; padding keys get no attention.
    sink_tokens: leave the first `sink_tokens` prompt tokens of each row out of the sum (attention sinks).
    first_row: compute query rows from this position on only (earlier rows are 0): the rows of the prompt are not
    scored, and skipping them is most of the recompute when prompts are longer than responses.
    Returns [B, T] float: row t is the prompt share of the attention of query position t.
    """
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim
    q, k = (t.float() for t in rotary_queries_keys(attention, hidden_states, position_embeddings))
    keys = prompt_mask.bool()
    if sink_tokens > 0:
        keys = keys & (keys.long().cumsum(dim=1) > sink_tokens)
    valid_keys = torch.ones_like(prompt_mask, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = torch.arange(length, device=hidden_states.device)
    scale = getattr(attention, "scaling", head_dim**-0.5)
    out = torch.zeros(batch, length, device=hidden_states.device)
    for start in range(max(first_row, 0), length, chunk_size):
        rows = positions[start : start + chunk_size]
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, rows], k) * scale
        allowed = (positions[None, :] <= rows[:, None])[None, None] & valid_keys[:, None, None, :]
        probs = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1).nan_to_num(0.0)
        out[:, rows] = (probs * keys[:, None, None, :]).sum(dim=-1).mean(dim=1)
    return out


# --- per-token log-probabilities (history, reference and curation passes) --------------------------------------

@contextmanager
def eval_mode(model: nn.Module):
    """No dropout for a scoring pass; the previous mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def token_logprobs(model: nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """log p(label_t | tokens < t) for t >= 1, [B, T-1]; 0 where the label is -100. `model` has a fused LM head."""
    with eval_mode(model), fused_head_labelled_positions_only():  # also outside a trainer (curation)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        use_cache=False)
    return outputs.log_probs.float()


def realign_reference(reference_logprobs: torch.Tensor, reference_labels: torch.Tensor,
                      response: torch.Tensor) -> torch.Tensor:
    """Scores of a reference sequence moved onto the main sequence's response positions.

    The reference sequence (e.g. PRIOR's prompt without its condition, then the same response) holds the same
    response tokens in the same order: its per-token values [B, T_ref - 1] at `reference_labels[:, 1:] != -100` go,
    in order, to the True positions of `response` [B, T - 1]; 0 elsewhere."""
    values = reference_logprobs[reference_labels[:, 1:] != -100]
    return torch.zeros(response.shape, dtype=reference_logprobs.dtype, device=reference_logprobs.device).masked_scatter(
        response, values)
