"""Attention over the keys a keep mask allows, differentiable in the mask (query-selector training).

Each allowed key's attention probability is multiplied by its keep value and the row renormalised:

    p'_ij = p_ij m_j / sum_k p_ik m_k

With a hard 0/1 mask the forward pass equals removing the m = 0 tokens from every layer's keys (positions
unchanged), yet d p'_ij / d m_j is non-zero for a removed token as well: a straight-through selector learns how
much a token it did not keep would have helped, where removing the token from the input gives it no gradient
at all (the attention masking of DynamicViT). Registered with `AttentionInterface` as "tokensieve_key_keep"; a
forward without the `key_keep` keyword runs the model's own attention (sdpa), so the switch is harmless elsewhere.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

KEEP_ATTENTION = "tokensieve_key_keep"
MIN_KEPT_MASS = 1e-6


def key_keep_attention(module, query, key, value, attention_mask, key_keep=None, **kwargs):
    """`key_keep` [B, K]: 1 keeps a key, 0 removes it; float values carry a straight-through gradient.

    Computed with the model's sdpa on values extended by one channel: attention over [m_j v_j, m_j] gives
    sum_j p_ij m_j v_j and sum_j p_ij m_j, whose ratio is the output above, without a [Q, K] matrix in memory.
    """
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if key_keep is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    keep = key_keep[:, None, :, None].to(value.dtype)  # [B, 1, K, 1]
    extended = torch.cat([value * keep, keep.expand(*value.shape[:-1], 1)], dim=-1)
    output, weights = sdpa(module, query, key, extended, attention_mask, **kwargs)  # [B, Q, H, d + 1]
    # A row that attends to almost nothing kept (e.g. a removed first token, alone under the causal mask) would
    # divide by ~0: below MIN_KEPT_MASS the division stops being differentiable in the mass (rows never read).
    kept_mass = output[..., -1:].clamp(min=MIN_KEPT_MASS)
    return (output[..., :-1] / kept_mass).contiguous(), weights


AttentionInterface.register(KEEP_ATTENTION, key_keep_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(KEEP_ATTENTION, sdpa_mask)
