"""Retention gates on a loaded decoder, without editing transformers: an attention function registered with
`AttentionInterface`, and a forward pre-hook on each layer's attention module that runs its gate.

What the attention function does, per call:
    gates off (or none)                -> the model's original attention, unchanged
    gates on, no cache (training/eval) -> softmax(q k / sqrt(d) + (t - i) log beta_i), the TRIM-KV training bias
                                          (optionally over the kept keys only: `train_with_eviction`)
    a RetentionCache                   -> plain attention over the kept tokens (no bias), log beta stored with K/V;
                                          with `decayed_attention`, the training bias over the kept tokens
    another cache (e.g. DynamicCache)  -> the original attention
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tokensieve.selectors.kv_cache import RetentionCache, check_memory_size
from tokensieve.selectors.retention import RetentionGate, retention_bias
from tokensieve.upstream import attn_implementation, cache_in, modeling_function

ATTENTION_NAME = "tokensieve_retention"


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    return [layer.self_attn for layer in _decoder(model).layers]


class RetentionState:
    """Everything the retention attention keeps on one attention module, in one place.

    fallback       the model's own attention implementation (gates off, or another kind of cache)
    enabled        False inside `gates_disabled` (the distillation teacher's forward)
    hook           the forward pre-hook that runs the gate (`_gate_hook`)
    train_memory   train_with_eviction's M (None: the soft bias only)
    kernel, chunk  how the training attention is computed (`set_training_kernel`)
    Set by the pre-hook for the attention call that follows it:
    cache_layer    the RetentionLayer of a cached forward (None otherwise)
    log_beta       the gate's output of an uncached forward, with its graph (None otherwise)

    An ordinary attribute of the attention module (`module.retention_state`); the per-token writes at decode go to
    this plain object, so they skip nn.Module.__setattr__'s checks of parameters, buffers and submodules.
    """

    __slots__ = ("fallback", "enabled", "hook", "train_memory", "kernel", "chunk", "cache_layer", "log_beta")

    def __init__(self, fallback: str = "sdpa"):
        self.fallback, self.enabled, self.hook = fallback, True, None
        self.train_memory, self.kernel, self.chunk = None, "fused", DEFAULT_CHUNK
        self.cache_layer = self.log_beta = None


STATE = "retention_state"  # the attention module's attribute


def retention_state(module: nn.Module) -> RetentionState | None:
    """The RetentionState of an attention module (None if it has no gate)."""
    return getattr(module, STATE, None)


def _fallback(module: nn.Module, query, key, value, attention_mask, **kwargs):
    state = retention_state(module)
    name = state.fallback if state is not None else "sdpa"
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name](module, query, key, value, attention_mask, **kwargs)
    eager = modeling_function(module, "eager_attention_forward")
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager wants an additive float mask
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, **kwargs)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def evicted_bias(bias: torch.Tensor, memory_size: int) -> torch.Tensor:
    """The training bias with every key a RetentionCache of `memory_size` would have evicted set to -inf.

    Per query row t and kv head, only the `memory_size` keys with the highest (t - i) log beta_i stay (ties keep
    more); the cache's ranking at inference. [B, H, T, T] -> same shape.
    """
    if memory_size >= bias.shape[-1]:
        return bias
    with torch.no_grad():
        threshold = bias.topk(memory_size, dim=-1).values[..., -1:]
    return bias.masked_fill(bias < threshold, -math.inf)


TRAINING_KERNELS = ("fused", "chunked", "flex", "dense")
DEFAULT_CHUNK = 128


def _block_bias(log_beta: torch.Tensor, allowed: torch.Tensor | None, start: int, rows: int) -> torch.Tensor:
    """Rows start .. start+rows of the training bias over keys 0 .. end (end = start + rows, causal): [B, H_kv, rows,
    end] in fp32, -inf above the diagonal and where `allowed` ([B, 1, rows, end] bool, the model's mask) is False."""
    end = start + rows
    age = (torch.arange(start, end, device=log_beta.device)[:, None]
           - torch.arange(end, device=log_beta.device)[None]).float()
    bias = age * log_beta[:, :, None, :end].float()
    visible = age >= 0 if allowed is None else ((age >= 0) & allowed.bool()) | (age == 0)  # see _with_diagonal
    return bias.masked_fill(~visible, -math.inf)


def _with_diagonal(attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's boolean mask with every query seeing itself: a left-padding row that sees nothing would give NaN,
    and NaN times a zero attention weight poisons the real rows after it. [B, 1, T, T] -> the same."""
    length = attention_mask.shape[-1]
    return attention_mask.bool() | torch.eye(length, dtype=torch.bool, device=attention_mask.device)


def _eviction_threshold(bias: torch.Tensor, memory: int) -> torch.Tensor | None:
    """Per row, the smallest bias a RetentionCache of `memory` keys keeps (None: the row fits, nothing evicted)."""
    if memory >= bias.shape[-1]:
        return None
    with torch.no_grad():
        return bias.topk(memory, dim=-1).values[..., -1:]


def _block_attention(query, key, value, log_beta, allowed, start: int, scaling: float, dropout: float,
                     memory: int | None, kept_only: bool = False) -> torch.Tensor:
    """One block of query rows of the gated attention, in fp32. query [B, H_kv, groups, rows, d] (a kv head's query
    heads side by side), key / value [B, H_kv, end, d], log_beta [B, H_kv, >= end] -> [B, H_kv, groups, rows, d].
    kept_only: with `memory`, only the attention over the kept keys (no soft output to pass a gradient through)."""
    bias = _block_bias(log_beta, allowed, start, query.shape[3])
    scores = torch.matmul(query, key[:, :, None].transpose(-1, -2)) * scaling  # [B, H_kv, groups, rows, end]

    def attend(with_bias):
        probs = (scores + with_bias[:, :, None]).softmax(dim=-1)
        if dropout:
            probs = F.dropout(probs, p=dropout)
        return torch.matmul(probs, value[:, :, None])

    threshold = _eviction_threshold(bias, memory) if memory is not None else None
    if kept_only:
        return attend(bias if threshold is None else bias.masked_fill(bias < threshold, -math.inf))
    output = attend(bias)
    if threshold is not None:
        # Straight-through eviction: the forward value is attention over the kept keys only (as at inference), the
        # gradient is the soft bias's (an evicted token still learns whether it should have stayed).
        output = output + (attend(bias.masked_fill(bias < threshold, -math.inf)) - output).detach()
    return output


def chunked_gated_attention(query, key, value, attention_mask, log_beta, scaling: float, dropout: float = 0.0,
                            memory: int | None = None, chunk: int = DEFAULT_CHUNK,
                            kept_only: bool = False) -> torch.Tensor:
    """softmax(q k / sqrt(d) + (t - i) log beta_i) v without a [T, T] tensor: query rows in blocks of `chunk`, each
    block's bias built, used and (under autograd) rebuilt in the backward pass by activation checkpointing, so
    memory is O(T x chunk) per head. fp32 whatever the inputs' dtype; `memory`: also evict as a RetentionCache
    would (straight-through; `kept_only`: the attention over the kept keys alone, for the fused kernel's forward
    value). query [B, H, T, d], key / value [B, H_kv, T, d] -> [B, H, T, d] (fp32)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.float().view(batch, kv_heads, heads // kv_heads, length, dim)
    key, value, log_beta = key.float(), value.float(), log_beta.float()
    checkpointed = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, log_beta))
    blocks = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        allowed = attention_mask[:, :, start:end, :end] if attention_mask is not None else None
        inputs = (grouped[:, :, :, start:end], key[:, :, :end], value[:, :, :end], log_beta[:, :, :end], allowed)
        options = {"start": start, "scaling": scaling, "dropout": dropout, "memory": memory, "kept_only": kept_only}
        if checkpointed:
            blocks.append(checkpoint(_block_attention, *inputs, use_reentrant=False, **options))
        else:
            blocks.append(_block_attention(*inputs, **options))
    return torch.cat(blocks, dim=3).view(batch, heads, length, dim)


def _only_causal(attention_mask: torch.Tensor | None) -> bool:
    """Whether sdpa's own causal mask shows every real query row the keys the model's mask shows it: no mask, or a
    causal mask with padding only at the end of each row. Padding rows may then see more keys than the model's mask
    lets them; their outputs only reach later padding positions, which carry no label and no capacity term."""
    if attention_mask is None:
        return True
    allowed = attention_mask[:, 0].bool()  # [B, T, T]
    length = allowed.shape[-1]
    real = allowed.any(dim=-2)  # keys some query sees: the real tokens
    if bool((real[:, 1:] & ~real[:, :-1]).any()):  # a real token after padding: not trailing padding only
        return False
    causal = torch.ones(length, length, dtype=torch.bool, device=allowed.device).tril()
    rows = real[:, :, None]
    return torch.equal(allowed & rows, causal & real[:, None, :] & rows)


def fused_gated_attention(query, key, value, attention_mask, log_beta, scaling: float, dropout: float = 0.0,
                          memory: int | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The gated attention in one fused sdpa call (flash attention on CPU, memory-efficient attention on CUDA): the
    bias is folded into two extra head dimensions, q'_t = [t - c, 1, q_t / sqrt(d)] and
    k'_i = [log beta_i, (c - i) log beta_i, k_i], so q'_t . k'_i = q_t k_i / sqrt(d) + (t - i) log beta_i (c: the
    middle position). Exact in math; in fp32 the two large terms cancel to the bias with a rounding error of about
    1e-7 |(t - c) log beta_i| (they come first in the dot product, so the diagonal's bias is exactly 0). Memory O(T):
    no score matrix is kept. A mask other than causal-with-trailing-padding (left padding, packed rows) is passed to
    sdpa as it is (slower kernels). `memory`: the forward value of the attention over the kept keys
    (`chunked_gated_attention(kept_only=True)`, blocks of `chunk` rows, no gradient), the gradient the soft bias's
    (straight-through).
    query [B, H, T, d], key / value [B, H_kv, T, d] -> [B, H, T, d] (fp32)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    log_beta = log_beta.float()
    extra = 2 if not query.is_cuda else -(-(dim + 2) // 8) * 8 - dim  # CUDA kernels want a multiple of 8
    offset = torch.arange(length, device=query.device, dtype=torch.float32) - (length - 1) / 2  # t - c
    query_extra = torch.zeros(batch, heads, length, extra, device=query.device)
    query_extra[..., 0], query_extra[..., 1] = offset, 1.0
    key_extra = F.pad(torch.stack([log_beta, -offset * log_beta], dim=-1), (0, extra - 2))
    folded_query = torch.cat([query_extra, query.float() * scaling], dim=-1)
    folded_key = torch.cat([key_extra, key.float()], dim=-1)
    folded_value = F.pad(value.float(), (extra, 0))  # the same head dim for the fused kernels; dropped after
    gqa = {"enable_gqa": True} if kv_heads != heads and not query.is_cuda else {}
    if kv_heads != heads and query.is_cuda:  # CUDA's memory-efficient kernel has no GQA: repeat as transformers does
        folded_key = _repeat_kv(folded_key, heads // kv_heads)
        folded_value = _repeat_kv(folded_value, heads // kv_heads)
    masking = {"is_causal": True} if _only_causal(attention_mask) else {"attn_mask": _with_diagonal(attention_mask)}
    output = F.scaled_dot_product_attention(folded_query, folded_key, folded_value, dropout_p=dropout, scale=1.0,
                                            **gqa, **masking)[..., extra:]
    if memory is not None and memory < length:
        with torch.no_grad():  # the forward value only: blocks of `chunk` rows, no backward pass
            evicted = chunked_gated_attention(query, key, value, attention_mask, log_beta, scaling, dropout, memory,
                                              chunk, kept_only=True)
        output = output + (evicted - output).detach()
    return output


@lru_cache(maxsize=None)
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention  # sequence lengths vary: dynamic after a recompile


def flex_gated_attention(query, key, value, attention_mask, log_beta, scaling: float, memory: int | None = None,
                         chunk: int = DEFAULT_CHUNK, compiled: bool | None = None) -> torch.Tensor:
    """The same attention with FlexAttention: the bias is a `score_mod` ((t - i) log beta_i, fp32) and causality and
    padding a block mask, so no [T, T] tensor is kept for the backward pass. Compiled on CUDA (where FlexAttention
    has fused kernels); eager elsewhere, which is exact but materialises the scores (use the chunked kernel there).
    Eviction thresholds are computed block by block without a gradient. -> [B, H, T, d] in the inputs' dtype (fp32
    off CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, heads, length, _ = query.shape
    groups = heads // key.shape[1]
    compiled = query.is_cuda if compiled is None else compiled
    if not query.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ValueError(f"the 'flex' training attention needs CUDA: FlexAttention has no backward pass on "
                         f"{query.device.type} (torch {torch.__version__}); use training_attention: chunked")
    if not query.is_cuda:
        query, key, value = query.float(), key.float(), value.float()
    log_beta = log_beta.float()
    mask = _with_diagonal(attention_mask) if attention_mask is not None else None

    def visible(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        return causal if mask is None else causal & mask[b, 0, q_idx, kv_idx]

    block_mask = create_block_mask(visible, batch, None, length, length, device=query.device)

    def biased(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * log_beta[b, h // groups, kv_idx]

    kernel = _flex_kernel(compiled)
    options = {"block_mask": block_mask, "scale": scaling, "enable_gqa": groups > 1}
    output = kernel(query, key, value, score_mod=biased, **options)
    if memory is not None and memory < length:
        threshold = torch.full((batch, key.shape[1], length), -math.inf, device=query.device)
        for start in range(0, length, chunk):  # the top-`memory` bias of every row, a block of rows at a time
            rows = min(chunk, length - start)
            allowed = mask[:, :, start:start + rows, :start + rows] if mask is not None else None
            found = _eviction_threshold(_block_bias(log_beta, allowed, start, rows), memory)
            if found is not None:
                threshold[:, :, start:start + rows] = found[..., 0]

        def evicting(score, b, h, q_idx, kv_idx):
            bias = (q_idx - kv_idx) * log_beta[b, h // groups, kv_idx]
            return torch.where(bias >= threshold[b, h // groups, q_idx], score + bias, -math.inf)

        output = output + (kernel(query, key, value, score_mod=evicting, **options) - output).detach()
    return output


def dense_gated_attention(query, key, value, attention_mask, log_beta, scaling: float, dropout: float = 0.0,
                          memory: int | None = None) -> torch.Tensor:
    """The reference: the whole [B, H, T, T] bias built and handed to sdpa (memory quadratic in T). fp32."""
    groups = query.shape[1] // key.shape[1]
    bias = retention_bias(log_beta.float())  # [B, H_kv, T, T]
    if attention_mask is not None:
        bias = bias.masked_fill(~_with_diagonal(attention_mask), -math.inf)
    query, key, value = query.float(), _repeat_kv(key, groups).float(), _repeat_kv(value, groups).float()

    def attend(scores):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=_repeat_kv(scores, groups),
                                              dropout_p=dropout, scale=scaling)

    output = attend(bias)
    if memory is not None and memory < bias.shape[-1]:
        output = output + (attend(evicted_bias(bias, memory)) - output).detach()
    return output


def _biased_attention(module, query, key, value, attention_mask, log_beta, scaling, dropout):
    """The gated training attention with the module's kernel (`set_training_kernel`). The bias (t - i) log beta_i
    grows with the distance t - i: rounded to bf16 it would be off by ~0.4%, in its gradient too, so it (and the
    softmax over it) stays fp32 whatever the model's dtype; the output goes back to the model's dtype."""
    state = retention_state(module) or RetentionState()
    memory, kernel, chunk = state.train_memory, state.kernel, state.chunk
    if kernel == "fused":
        output = fused_gated_attention(query, key, value, attention_mask, log_beta, scaling, dropout, memory, chunk)
    elif kernel == "chunked":
        output = chunked_gated_attention(query, key, value, attention_mask, log_beta, scaling, dropout, memory, chunk)
    elif kernel == "flex":
        if dropout:
            raise ValueError("the flex training kernel has no attention dropout; use the chunked kernel")
        output = flex_gated_attention(query, key, value, attention_mask, log_beta, scaling, memory, chunk)
    else:
        output = dense_gated_attention(query, key, value, attention_mask, log_beta, scaling, dropout, memory)
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def _cached_attention(module, layer, query, key, value, attention_mask, scaling):
    batch, heads, q, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # The mask's diagonal says which new tokens are real (left padding shows up there).
        steps = torch.arange(q, device=query.device)
        layer.mark_real(attention_mask[:, 0, steps, length - q + steps])
    if q == 1 and not layer.padded and not layer.needs_attention and not layer.decayed_attention:
        # Decoding without padding: every cached token is visible, no mask needed (the fast path). The same sdpa call
        # as transformers' own sdpa attention makes for a maskless decode step (GQA inside the kernel).
        output = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=groups > 1)
        return output.transpose(1, 2).contiguous(), None
    grouped = query.reshape(batch, kv_heads, groups * q, dim)  # a kv head's query heads as extra rows (GQA)
    steps = torch.arange(q, device=query.device)
    allowed = layer.valid[:, :, None, :].expand(-1, -1, q, -1).clone()  # [B, H_kv, q, L]
    if q > 1:
        allowed[..., length - q:] &= torch.ones(q, q, dtype=torch.bool, device=query.device).tril()  # causal
    allowed[:, :, steps, length - q + steps] = True  # a padding query attends to itself (its output is unused)
    if layer.decayed_attention:
        output = _decayed_cached_attention(layer, grouped, key, value, allowed, scaling, q, groups)
        output = output.view(batch, heads, q, dim)
    elif layer.needs_attention:
        allowed = _repeat_kv(allowed, groups)
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
        scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), key.float()) * scaling
        probs = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1)
        layer.observe(probs, groups)
        output = torch.einsum("bhqk,bhkd->bhqd", probs.to(value.dtype), value)
    else:
        if groups > 1:
            allowed = allowed[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, kv_heads, groups * q, length)
        output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=allowed, scale=scaling)
        output = output.view(batch, heads, q, dim)
    return output.transpose(1, 2).contiguous(), None


def _decayed_cached_attention(layer, grouped, key, value, allowed, scaling: float, q: int, groups: int):
    """Attention over the kept tokens with the training bias: logit + (t - pos) log beta for a query at absolute
    position t, so a kept token counts as much as it did in soft training (fp32, like the training kernels).
    grouped: [B, H_kv, groups * q, d] (a kv head's query heads as rows), allowed: [B, H_kv, q, L]."""
    batch, kv_heads, length = key.shape[0], key.shape[1], key.shape[2]
    rows = torch.arange(layer.seen - q, layer.seen, device=key.device)  # the queries' absolute positions
    age = (rows[:, None] - layer.positions[:, :, None, :]).clamp(min=0)  # [B, H_kv, q, L]
    bias = (age * layer.log_beta[:, :, None, :]).masked_fill(~allowed, -math.inf)
    if groups > 1:
        bias = bias[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, kv_heads, groups * q, length)
    output = F.scaled_dot_product_attention(grouped.float(), key.float(), value.float(), attn_mask=bias, scale=scaling)
    return output.to(value.dtype)


def retention_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "tokensieve_retention" (see the module docstring)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    state = retention_state(module)
    if state is not None and state.cache_layer is not None:
        return _cached_attention(module, state.cache_layer, query, key, value, attention_mask, scaling)
    log_beta = state.log_beta if state is not None else None
    if log_beta is None:
        return _fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return _biased_attention(module, query, key, value, attention_mask, log_beta, scaling, dropout)


def _gate_hook(module, args, kwargs):
    """Before each attention call: run the gate on the attention input and tell the cache or the bias about it."""
    # Runs once per layer and decoded token: a plain object's attributes, no nn.Module bookkeeping.
    state = module.retention_state
    cache = cache_in(kwargs)  # `cache=` from transformers 5.24, `past_key_values=` before
    state.cache_layer = state.log_beta = None
    if cache is not None and not isinstance(cache, RetentionCache):
        return None  # another cache: the original attention, the gate is not needed
    gate = module._modules.get("retention_gate") if state.enabled else None  # none: attach_cache_attention
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if cache is not None:
        # The cache runs the gate when it next evicts, once for all the tokens added since (decoding runs no gate).
        layer = cache.layers[module.layer_idx]
        layer.pending_gate = None if gate is None else (gate, hidden.detach() if hidden.requires_grad else hidden)
        state.cache_layer = layer
    else:
        state.log_beta = None if gate is None else gate(hidden)  # with its graph: the capacity loss


AttentionInterface.register(ATTENTION_NAME, retention_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def attach_gates(model: nn.Module, intermediate_size: int = 512, bias_init: float = 18.0,
                 act: str | None = None) -> list[RetentionGate]:
    """Give every decoder layer a RetentionGate and switch the model to the retention attention function.

    Works on Llama, Qwen2 and Qwen3 style decoders (and PEFT wrappers of them). Returns the gates, in layer order.
    The gates are submodules of the attention modules, so they move, save and load with the model.
    """
    config = model.config.get_text_config(decoder=True)
    original = attn_implementation(model) or "sdpa"
    if original == ATTENTION_NAME:
        raise ValueError("this model already has retention gates attached")
    parameter = next(model.parameters())
    gates = []
    for attention in attention_modules(model):
        gate = RetentionGate(config.hidden_size, config.num_key_value_heads, intermediate_size, bias_init,
                             act or config.hidden_act).to(device=parameter.device, dtype=torch.float32)
        attention.retention_gate = gate
        state = attention.retention_state = RetentionState(original)
        state.hook = attention.register_forward_pre_hook(_gate_hook, with_kwargs=True)
        gates.append(gate)
    model.set_attn_implementation(ATTENTION_NAME)
    return gates


def attach_cache_attention(model: nn.Module) -> None:
    """Switch a model without gates to the retention attention, so that a RetentionCache works as designed with any
    heuristic policy: padding is tracked, evicted columns are masked by the cache's own validity, and h2o / snapkv
    see the attention probabilities they score by. (With the model's own attention the cache still evicts, but those
    two policies then see no attention at all and rank every token alike, and left padding is not tracked.)"""
    original = attn_implementation(model) or "sdpa"
    if original == ATTENTION_NAME:
        return  # gates, or this, already attached
    for attention in attention_modules(model):
        state = attention.retention_state = RetentionState(original)
        state.hook = attention.register_forward_pre_hook(_gate_hook, with_kwargs=True)
    model.set_attn_implementation(ATTENTION_NAME)


def detach_gates(model: nn.Module) -> None:
    """Remove the gates (or what attach_cache_attention attached) and restore the original attention implementation."""
    original = None
    for attention in attention_modules(model):
        state = retention_state(attention)
        if state is None:
            continue
        del attention.retention_state
        state.hook.remove()
        original = state.fallback
        if hasattr(attention, "retention_gate"):
            del attention.retention_gate
    if original is not None:
        model.set_attn_implementation(original)


def train_with_eviction(model: nn.Module, memory_size: int | None) -> None:
    """Make the gated training forward evict as a RetentionCache of `memory_size` would (None: the soft bias only).

    See `evicted_bias`; the gradient stays the soft bias's (straight-through).
    """
    if memory_size is not None:  # None: no eviction
        check_memory_size(memory_size)
    for attention in attention_modules(model):
        _require_state(attention).train_memory = memory_size


def set_training_kernel(model: nn.Module, kernel: str = "fused", chunk: int = DEFAULT_CHUNK) -> None:
    """How the gated training attention is computed (the same result up to rounding, different time and memory):
    "fused" (default): the bias folded into the head dimension of one sdpa call (`fused_gated_attention`), memory
    O(T); "chunked": query rows in blocks of `chunk`, explicit fp32 attention, memory O(T x chunk); "flex":
    FlexAttention with the bias as a score_mod, compiled on CUDA; "dense": the whole [B, H, T, T] bias (the
    reference, quadratic memory). `chunk` is also the block of train_with_eviction's evicted forward."""
    if kernel not in TRAINING_KERNELS:
        raise ValueError(f"training kernel must be one of {', '.join(TRAINING_KERNELS)}, got {kernel!r}")
    if chunk < 1:
        raise ValueError(f"the training kernel's chunk must be >= 1, got {chunk}")
    for attention in attention_modules(model):
        state = _require_state(attention)
        state.kernel, state.chunk = kernel, chunk


def _require_state(attention: nn.Module) -> RetentionState:
    state = retention_state(attention)
    if state is None:
        raise ValueError("the model has no retention gates attached (attach_gates or load_gates first)")
    return state


def gates_of(model: nn.Module) -> list[RetentionGate]:
    gates = [getattr(a, "retention_gate", None) for a in attention_modules(model)]
    if any(g is None for g in gates):
        raise ValueError("the model has no retention gates attached (attach_gates or load_gates first)")
    return gates


@contextmanager
def gates_disabled(model: nn.Module):
    """Run the model as if it had no gates (the teacher of distillation; no second copy of the weights)."""
    modules = attention_modules(model)
    states = [_require_state(m) for m in modules]
    previous = [state.enabled for state in states]
    for state in states:
        state.enabled = False
    try:
        yield model
    finally:
        for state, enabled in zip(states, previous):
            state.enabled = enabled


def collected_log_beta(model: nn.Module) -> torch.Tensor:
    """log beta of the last forward without a cache, all layers stacked: [B, layers * H_kv, T] (with its graph)."""
    values = [getattr(retention_state(m), "log_beta", None) for m in attention_modules(model)]
    if any(v is None for v in values):
        raise ValueError("no log beta recorded: run a forward with gates on and without a cache first")
    return torch.cat(values, dim=1)
