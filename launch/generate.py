"""Bounded-memory generation: the prompt is prefilled in chunks into a RetentionCache, so the KV cache never holds
more than memory_size + buffer_size tokens per (layer, kv head), during the prompt as well as during decoding.

    tokensieve generate outputs/tiny/trim_kv --prompt "..." --memory-size 64
"""

from __future__ import annotations

import torch

from tokensieve.errors import ModelError
from tokensieve.selectors.attention import attach_cache_attention
from tokensieve.selectors.kv_cache import POLICIES, RetentionCache, cache_attention, cache_sizes
from tokensieve.upstream import with_cache


@torch.no_grad()
def bounded_generate(model, input_ids, attention_mask, cache: RetentionCache, chunk_size: int | None = None,
                     **generate_kwargs):
    """`model.generate` with `cache`, after prefilling all but the last prompt token in chunks of `chunk_size`
    (default: the cache's buffer size). Left padding is fine: positions come from the attention mask."""
    chunk_size = chunk_size or cache.buffer_size
    length = input_ids.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    for start in range(0, length - 1, chunk_size):
        end = min(start + chunk_size, length - 1)
        model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
              position_ids=positions[:, start:end], use_cache=True, **with_cache(model, cache))
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **with_cache(model, cache), **generate_kwargs)


@torch.no_grad()
def bounded_logits(model, input_ids, attention_mask, cache: RetentionCache, chunk_size: int | None = None):
    """Logits [B, T, V] of every position when the sequence is read in chunks of `chunk_size` (default: the cache's
    buffer size) through `cache`: each chunk sees only what the cache kept of the tokens before it."""
    chunk_size = chunk_size or cache.buffer_size
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = []
    for start in range(0, input_ids.shape[1], chunk_size):
        end = min(start + chunk_size, input_ids.shape[1])
        output = model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                       position_ids=positions[:, start:end], use_cache=True, **with_cache(model, cache))
        logits.append(output.logits)
    return torch.cat(logits, dim=1)


def load_for_generation(path: str, policy: str):
    """A gates export (gates.json present) loads with its gates; any other model loads plainly (baseline policies)."""
    import os

    from tokensieve.launch.export import GATES_CONFIG, load_retention_model, read_gates_config
    from tokensieve.launch.model import ModelArguments, load_model_and_tokenizer

    if os.path.isfile(os.path.join(path, GATES_CONFIG)):
        model, tokenizer = load_retention_model(path)
        return model, tokenizer, read_gates_config(path)
    if policy == "gates":
        raise ModelError(f"{path}: no {GATES_CONFIG}: policy 'gates' needs a retention-gate export "
                         f"(or choose one of {', '.join(p for p in POLICIES if p != 'gates')})")
    model, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=path))
    attach_cache_attention(model)  # the cache's own attention: padding, evicted columns, h2o/snapkv's probabilities
    return model.eval(), tokenizer, {}


def generate_text(path: str, prompts: list[str], memory_size: int | None = None, buffer_size: int | None = None,
                  policy: str = "gates", max_new_tokens: int = 64, attention: str | None = None) -> list[dict]:
    """Generate for each prompt with a bounded cache; returns text and cache statistics per prompt. `attention`:
    "plain" or "decayed" for the gates' cache (default: the export's)."""
    if policy not in POLICIES:
        raise ModelError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    model, tokenizer, config = load_for_generation(path, policy)
    memory_size, buffer_size = cache_sizes(config, memory_size, buffer_size)
    try:
        decayed = cache_attention(config, attention, policy)
    except ValueError as error:
        raise ModelError(f"--attention: {error}") from None
    results = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        cache = RetentionCache.for_model(model, memory_size, buffer_size, policy, decayed_attention=decayed)
        output = bounded_generate(model, encoded["input_ids"], encoded["attention_mask"], cache,
                                  max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        results.append({"prompt": prompt, "completion": text, "tokens_seen": cache.get_seq_length(),
                        "kv_tokens_kept": cache.layers[0].physical_length(), "kv_bytes": cache.nbytes()})
    return results
