"""Retention gates on a loaded decoder, without editing transformers: an attention function registered with
`AttentionInterface`, and a forward pre-hook on each layer's attention module that runs its gate.

What the attention function does, per call:
    gates off (or none)                -> the model's original attention, unchanged
    gates on, no cache (training/eval) -> softmax(q k / sqrt(d) + (t - i) log beta_i), the TRIM-KV training bias
                                          (optionally over the kept keys only: `train_with_eviction`)
    a RetentionCache                   -> plain attention over the kept tokens (no bias), log beta stored with K/V
    another cache (e.g. DynamicCache)  -> the original attention
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tokensieve.selectors.kv_cache import RetentionCache
from tokensieve.selectors.retention import RetentionGate, retention_bias
from tokensieve.upstream import attn_implementation, cache_in, modeling_function

ATTENTION_NAME = "tokensieve_retention"


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    return [layer.self_attn for layer in _decoder(model).layers]


def _fallback(module: nn.Module, query, key, value, attention_mask, **kwargs):
    name = getattr(module, "_retention_fallback", "sdpa")
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


def _biased_attention(module, query, key, value, attention_mask, log_beta, scaling, dropout):
    groups = query.shape[1] // key.shape[1]
    bias = retention_bias(log_beta.float())  # [B, H_kv, T, T]
    if attention_mask is not None:
        bias = bias.masked_fill(~attention_mask.bool(), -math.inf)
    # The bias (t - i) log beta_i grows with the distance t - i: rounded to bf16 it would be off by ~0.4%, in its
    # gradient too. So the biased softmax runs in fp32 whatever the model's dtype; the output goes back to it.
    dtype = query.dtype
    query, key, value = query.float(), _repeat_kv(key, groups).float(), _repeat_kv(value, groups).float()

    def attend(scores):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=_repeat_kv(scores, groups),
                                              dropout_p=dropout, scale=scaling)

    output = attend(bias)
    memory = module.__dict__.get("_retention_train_memory")
    if memory is not None and memory < bias.shape[-1]:
        # Straight-through eviction: the forward value is attention over the kept keys only (as at inference), the
        # gradient is the soft bias's (an evicted token still learns whether it should have stayed).
        output = output + (attend(evicted_bias(bias, memory)) - output).detach()
    return output.to(dtype).transpose(1, 2).contiguous(), None


def _cached_attention(module, layer, query, key, value, attention_mask, scaling):
    batch, heads, q, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # The mask's diagonal says which new tokens are real (left padding shows up there).
        steps = torch.arange(q, device=query.device)
        real = attention_mask[:, 0, steps, length - q + steps]
        if layer.padded or not bool(real.all()):
            layer.padded = True  # first, so that the layer keeps the validity written here
            layer.valid[:, :, length - q:] = real[:, None, :]
    if q == 1 and not layer.padded and not layer.needs_attention:
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
    if layer.needs_attention:
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


def retention_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "tokensieve_retention" (see the module docstring)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = getattr(module, "_retention_cache_layer", None)
    if layer is not None:
        return _cached_attention(module, layer, query, key, value, attention_mask, scaling)
    log_beta = getattr(module, "_retention_log_beta", None)
    if log_beta is None:
        return _fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return _biased_attention(module, query, key, value, attention_mask, log_beta, scaling, dropout)


def _gate_hook(module, args, kwargs):
    """Before each attention call: run the gate on the attention input and tell the cache or the bias about it."""
    # Runs once per layer and decoded token: state goes straight into the module's __dict__ (nn.Module.__setattr__
    # checks parameters, buffers and submodules on every call, a visible cost at decode).
    state = module.__dict__
    cache = cache_in(kwargs)  # `cache=` from transformers 5.24, `past_key_values=` before
    state["_retention_cache_layer"] = state["_retention_log_beta"] = None
    if cache is not None and not isinstance(cache, RetentionCache):
        return None  # another cache: the original attention, the gate is not needed
    gate = module._modules["retention_gate"] if state.get("_retention_enabled", True) else None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if cache is not None:
        # The cache runs the gate when it next evicts, once for all the tokens added since (decoding runs no gate).
        layer = cache.layers[module.layer_idx]
        layer.pending_gate = None if gate is None else (gate, hidden.detach() if hidden.requires_grad else hidden)
        state["_retention_cache_layer"] = layer
    else:
        state["_retention_log_beta"] = None if gate is None else gate(hidden)  # with its graph: the capacity loss


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
        attention._retention_fallback = original
        attention._retention_enabled = True
        attention._retention_hook = attention.register_forward_pre_hook(_gate_hook, with_kwargs=True)
        gates.append(gate)
    model.set_attn_implementation(ATTENTION_NAME)
    return gates


def detach_gates(model: nn.Module) -> None:
    """Remove the gates and restore the original attention implementation."""
    original = None
    for attention in attention_modules(model):
        if not hasattr(attention, "retention_gate"):
            continue
        attention._retention_hook.remove()
        original = attention._retention_fallback
        for name in ("retention_gate", "_retention_hook", "_retention_fallback", "_retention_enabled",
                     "_retention_cache_layer", "_retention_log_beta", "_retention_train_memory"):
            if hasattr(attention, name):
                delattr(attention, name)
    if original is not None:
        model.set_attn_implementation(original)


def train_with_eviction(model: nn.Module, memory_size: int | None) -> None:
    """Make the gated training forward evict as a RetentionCache of `memory_size` would (None: the soft bias only).

    See `evicted_bias`; the gradient stays the soft bias's (straight-through).
    """
    if memory_size is not None and memory_size < 1:
        raise ValueError(f"memory_size must be >= 1, got {memory_size}")
    for attention in attention_modules(model):
        attention.__dict__["_retention_train_memory"] = memory_size


def gates_of(model: nn.Module) -> list[RetentionGate]:
    gates = [getattr(a, "retention_gate", None) for a in attention_modules(model)]
    if any(g is None for g in gates):
        raise ValueError("the model has no retention gates attached (attach_gates or load_gates first)")
    return gates


@contextmanager
def gates_disabled(model: nn.Module):
    """Run the model as if it had no gates (the teacher of distillation; no second copy of the weights)."""
    modules = attention_modules(model)
    previous = [getattr(m, "_retention_enabled", True) for m in modules]
    for m in modules:
        m._retention_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m._retention_enabled = state


def collected_log_beta(model: nn.Module) -> torch.Tensor:
    """log beta of the last forward without a cache, all layers stacked: [B, layers * H_kv, T] (with its graph)."""
    values = [getattr(m, "_retention_log_beta", None) for m in attention_modules(model)]
    if any(v is None for v in values):
        raise ValueError("no log beta recorded: run a forward with gates on and without a cache first")
    return torch.cat(values, dim=1)
