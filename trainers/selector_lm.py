"""How a frozen causal LM works with a query selector: features for scoring, the reduced input, greedy answers.

    features     the first `layer` decoder layers over [context; query] (no grad): the residual stream entering
                 layer `layer` gives contextual candidate and query features; the same pass yields that layer's
                 queries/keys for PromptDistill-style scoring. The rest of the network is skipped.
    reduced LM   input embeddings of the kept context tokens (times the keep mask, so gradients reach the
                 selector), at their original positions, then the query (and answer) tokens after the full context.
    prefill      the whole LM over that input (the selector, GemFilter and the position baselines), or PromptDistill's
                 two stages: the full prompt through the selection layer, then only the kept tokens' hidden states.
    answers      greedy decoding from the prefilled KV cache (positions continue after the query); the decoder layers
                 are called one by one so that each stage's layers read their own cache.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from tokensieve.errors import DataError
from tokensieve.selectors.kv_cache import cache_bytes
from tokensieve.selectors.token_scores import capture_attention_inputs, rotary_queries_keys
from tokensieve.upstream import attn_implementation, run_decoder_layers


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def split_prompt(prompt: str, separator: str) -> tuple[str, str]:
    """(context, query): the query starts at the last `separator` of the prompt."""
    cut = prompt.rfind(separator)
    if cut == 0:
        raise ValueError(f"the context is empty: the prompt starts with the query separator {separator!r}")
    if cut < 0:
        raise ValueError(f"separator {separator!r} not found after the start of the prompt")
    return prompt[:cut], prompt[cut:]


def check_selector_lengths(where: str, context_tokens: int, query_tokens: int, limit: int | None,
                           limit_name: str) -> None:
    """A DataError if there is no context to select from, or the query (+ answer) alone fills the length limit."""
    if context_tokens == 0:
        raise DataError(f"{where}: the context is empty (a query selector needs context tokens to select from)")
    if limit is not None and query_tokens >= limit:
        raise DataError(f"{where}: the query (and answer) take {query_tokens} tokens and {limit_name} is {limit}: "
                        f"no room for any context (shorten the query or raise {limit_name})")


@dataclass
class Features:
    context: torch.Tensor  # [B, N, D] residual stream entering layer `layer`, context positions
    query: torch.Tensor  # [B, L, D] same, query positions
    q_last: torch.Tensor  # [B, H, d] layer `layer`'s query of the last query token (RoPE applied)
    context_keys: torch.Tensor  # [B, H, N, d] layer `layer`'s keys of the context tokens


@torch.no_grad()
def lm_features(model, context_ids, context_mask, query_ids, query_mask, layer: int,
                score_layer: int | None = None) -> Features:
    """Run decoder layers 0 .. layer-1 over [context (right-padded); query (right-padded)] and stop.

    `score_layer` (default `layer`, at least `layer`): the layer whose queries and keys fill `q_last` and
    `context_keys`; the forward then runs through layer score_layer - 1 and stops there. The residual features are
    always those entering `layer`.
    """
    decoder = _base(model).get_decoder()
    if not 0 <= layer < len(decoder.layers):
        raise ValueError(f"feature layer must be in [0, {len(decoder.layers) - 1}], got {layer}")
    score_layer = layer if score_layer is None else score_layer
    if not layer <= score_layer < len(decoder.layers):
        raise ValueError(f"score layer must be in [{layer}, {len(decoder.layers) - 1}], got {score_layer}")
    ids = torch.cat([context_ids, query_ids], dim=1)
    mask = torch.cat([context_mask, query_mask], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    captured = {}

    def grab_residual(module, args, kwargs):
        captured["residual"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    attention = decoder.layers[score_layer].self_attn
    handle = decoder.layers[layer].register_forward_pre_hook(grab_residual, with_kwargs=True)
    with capture_attention_inputs(attention) as attn_inputs:
        def stop(module, args, kwargs):
            raise _Stop

        stopper = attention.register_forward_pre_hook(stop, with_kwargs=True, prepend=False)
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        except _Stop:
            pass
        finally:
            stopper.remove()
            handle.remove()
    n = context_ids.shape[1]
    residual = captured["residual"]
    q, k = rotary_queries_keys(attention, attn_inputs["hidden_states"], attn_inputs["position_embeddings"])
    last = n + query_mask.long().sum(-1) - 1  # index of each row's last query token
    q_last = q[torch.arange(q.shape[0]), :, last]
    return Features(context=residual[:, :n], query=residual[:, n:], q_last=q_last, context_keys=k[:, :, :n])


def reduced_inputs(model, context_ids, context_mask, keep, query_ids, query_mask, answer_ids=None,
                   answer_mask=None, left_pad: bool = False) -> dict:
    """inputs_embeds / attention_mask / position_ids (/ labels) of [kept context; query; answer] per row.

    `keep` [B, N]: float (straight-through: the kept embeddings are scaled by it, 1.0 in the forward pass) or bool.
    Kept tokens keep their original positions; the query starts at the context's real length.
    """
    embed = _base(model).get_input_embeddings()
    rows = []
    for b in range(context_ids.shape[0]):
        index = (keep[b] > 0.5).nonzero().squeeze(-1)
        length = int(context_mask[b].sum())
        tail_ids = query_ids[b][query_mask[b].bool()]
        answer = answer_ids[b][answer_mask[b].bool()] if answer_ids is not None else tail_ids[:0]
        weights = keep[b, index].to(embed.weight.dtype)[:, None] if keep.dtype != torch.bool else 1.0
        parts = [embed(context_ids[b, index]) * weights, embed(torch.cat([tail_ids, answer]))]
        positions = torch.cat([index, length + torch.arange(len(tail_ids) + len(answer), device=index.device)])
        labels = torch.cat([torch.full((len(index) + len(tail_ids),), -100, device=index.device), answer])
        rows.append((torch.cat(parts), positions, labels))
    width = max(r[0].shape[0] for r in rows)
    dim = rows[0][0].shape[-1]
    embeds = rows[0][0].new_zeros(len(rows), width, dim)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
    labels = torch.full((len(rows), width), -100, dtype=torch.long, device=embeds.device)
    for b, (row, pos, lab) in enumerate(rows):
        span = slice(width - len(row), width) if left_pad else slice(0, len(row))
        embeds[b, span], mask[b, span], positions[b, span], labels[b, span] = row, 1, pos, lab
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "labels": labels}


# --- inference: prefill (whole model, or PromptDistill's two stages) then greedy decoding -------------------------


def _additive_mask(valid: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, queries, K] additive mask: the queries are the last `queries` of the K keys (cache + new), causal by
    index, padding keys (`valid` 0) masked. A float mask works with both eager and sdpa attention."""
    keys = valid.shape[1]
    rows = torch.arange(queries, device=valid.device)[:, None] + keys - queries
    allowed = (torch.arange(keys, device=valid.device)[None] <= rows)[None, None] & valid.bool()[:, None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _run_layers(model, layers: range, hidden, positions, valid, cache) -> torch.Tensor:
    """Decoder layers `layers` over `hidden` [B, T, D], appending to `cache`; `valid` [B, K] marks the real keys of
    those layers' cache after this call (K = cached + T)."""
    mask = _additive_mask(valid, hidden.shape[1], hidden.dtype)
    return run_decoder_layers(_base(model).get_decoder(), layers, hidden, mask, positions, cache)


def _next_token_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[B, V] logits from the last position's hidden state (final norm, LM head)."""
    base = _base(model)
    return base.get_output_embeddings()(base.get_decoder().norm(hidden[:, -1]))


@dataclass
class Prefill:
    """A prompt after prefill, ready for greedy decoding.

    `stages`: (decoder layers, key mask [B, K] of those layers' cache) in layer order; one stage for methods that
    run the whole model on one input, two for PromptDistill (layers 0..l hold the full context, the rest only the
    kept tokens)."""

    logits: torch.Tensor  # [B, V] next-token logits after the prompt
    cache: DynamicCache
    stages: list[tuple[range, torch.Tensor]]
    next_position: torch.Tensor  # [B, 1] position of the first generated token
    keep: torch.Tensor  # [B, N] bool, the kept context tokens

    def kv_bytes(self) -> int:
        """Bytes held by the KV cache (keys and values of every layer, padding included)."""
        return cache_bytes(self.cache)


def _check_attention(model) -> None:
    from tokensieve.selectors.keep_attention import KEEP_ATTENTION  # sdpa when no key_keep is passed

    implementation = attn_implementation(_base(model))
    if implementation not in ("eager", "sdpa", KEEP_ATTENTION):
        raise ValueError(f"selector inference runs the decoder layers with a float attention mask, which needs the "
                         f"'eager' or 'sdpa' attention implementation; the model uses {implementation!r}")


def prefill_reduced(model, batch: dict, keep: torch.Tensor, contiguous_positions: bool = False) -> Prefill:
    """The whole model over [kept context; query] (left-padded): the kept tokens at their original positions and
    the query after the full context's length, or, with `contiguous_positions`, everything renumbered 0, 1, ...
    as if the kept tokens were the whole prompt (GemFilter)."""
    _check_attention(model)
    inputs = reduced_inputs(model, batch["context_ids"], batch["context_mask"], keep, batch["query_ids"],
                            batch["query_mask"], left_pad=True)
    valid, positions = inputs["attention_mask"], inputs["position_ids"]
    if contiguous_positions:
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=_base(model).config)
    layers = range(len(_base(model).get_decoder().layers))
    hidden = _run_layers(model, layers, inputs["inputs_embeds"], positions, valid, cache)
    return Prefill(_next_token_logits(model, hidden), cache, [(layers, valid)],
                   positions.max(dim=-1, keepdim=True).values + 1, keep.bool())


def prefill_promptdistill(model, batch: dict, layer: int, target: torch.Tensor) -> Prefill:
    """PromptDistill (arXiv 2503.23274): layers 0..`layer` run over the full [context; query]; at `layer` the context
    is scored by the head-mean q_last . k_j of that layer's attention (avg-pooled), the top `target` tokens are
    kept, and only their hidden states leaving `layer` (plus the query's), at their original positions, go on
    through the later layers. The KV cache of layers 0..`layer` holds the full prompt, the later ones only the kept
    tokens and the query."""
    from tokensieve.selectors.query_selector import promptdistill_scores
    from tokensieve.selectors.topn import hard_top_n

    depth = len(_base(model).get_decoder().layers)
    if not 0 <= layer <= depth - 2:
        raise ValueError(f"the PromptDistill selection layer must be in [0, {depth - 2}] (at least one layer must "
                         f"run on the kept tokens), got {layer}")
    attention = _base(model).get_decoder().layers[layer].self_attn

    def choose(hidden, captured, context_index):
        q, k = rotary_queries_keys(attention, captured["hidden_states"], captured["position_embeddings"])
        keys = k.gather(2, context_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1]))
        return hard_top_n(promptdistill_scores(q[:, :, -1], keys, batch["context_mask"]), target, batch["context_mask"])

    return prefill_two_stage(model, batch, layer + 1, choose, capture=attention)


def prefill_two_stage(model, batch: dict, split: int, choose, capture=None) -> Prefill:
    """Layers 0..split-1 run over the full [context; query] (left-padded); `choose(hidden, captured, context_index)`
    then returns the bool keep mask [B, N] over the context (`hidden`: the residual stream leaving layer split-1,
    [B, W, D]; `context_index` [B, N]: each context token's column in it; `captured`: the inputs of the attention
    module `capture`, if given), and only the kept tokens' hidden states and the query's, at their original
    positions, go on through layers split..depth-1. The KV cache of the first layers holds the full prompt, the
    later ones only the kept tokens and the query (PromptDistill's prefill, with any choice of tokens)."""
    _check_attention(model)
    depth = len(_base(model).get_decoder().layers)
    if not 1 <= split <= depth - 1:
        raise ValueError(f"a two-stage prefill needs at least one layer before and after the split; got split {split} "
                         f"of {depth} layers")
    context_mask = batch["context_mask"]
    full = reduced_inputs(model, batch["context_ids"], context_mask, context_mask.bool(), batch["query_ids"],
                          batch["query_mask"], left_pad=True)
    valid, positions = full["attention_mask"], full["position_ids"]
    cache = DynamicCache(config=_base(model).config)
    with ExitStack() as stack:
        captured = stack.enter_context(capture_attention_inputs(capture)) if capture is not None else {}
        hidden = _run_layers(model, range(split), full["inputs_embeds"], positions, valid, cache)
    width, count = valid.shape[1], context_mask.shape[1]
    start = width - valid.sum(-1, keepdim=True)  # left padding: each row's context begins here
    context_index = (start + torch.arange(count, device=valid.device)).clamp(max=width - 1)  # [B, N]
    keep = choose(hidden, captured, context_index) & context_mask.bool()
    query_lengths = batch["query_mask"].sum(-1)
    rows = [torch.cat([context_index[b][keep[b]], torch.arange(width - int(query_lengths[b]), width,
                                                              device=valid.device)]) for b in range(len(keep))]
    kept_width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), kept_width, dtype=torch.long, device=valid.device)
    kept_valid = torch.zeros_like(index)
    for b, row in enumerate(rows):
        index[b, kept_width - len(row):], kept_valid[b, kept_width - len(row):] = row, 1
    hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    kept_positions = positions.gather(1, index)
    later = range(split, depth)
    hidden = _run_layers(model, later, hidden, kept_positions, kept_valid, cache)
    return Prefill(_next_token_logits(model, hidden), cache, [(range(split), valid), (later, kept_valid)],
                   positions.max(dim=-1, keepdim=True).values + 1, keep)


@torch.no_grad()
def greedy_decode(model, state: Prefill, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation [B, max_new_tokens] of a prefilled prompt; each stage's layers read their own cache."""
    embed = _base(model).get_input_embeddings()
    logits, position, stages = state.logits, state.next_position, list(state.stages)
    tokens = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 == max_new_tokens:
            break
        hidden = embed(token)
        for index, (layers, valid) in enumerate(stages):
            valid = torch.cat([valid, torch.ones_like(token)], dim=1)
            stages[index] = (layers, valid)
            hidden = _run_layers(model, layers, hidden, position, valid, state.cache)
        logits = _next_token_logits(model, hidden)
        position = position + 1
    return torch.cat(tokens, dim=1)


SELECTION_METHODS = ("selector", "selector-states", "promptdistill", "gemfilter", "qk-top", "first", "last", "random",
                     "full")


class SelectorPipeline:
    """Context + query -> kept context tokens -> greedy answer, for a trained selector or a training-free baseline.

    Methods ("selector" and the position baselines read the kept tokens' embeddings at their original positions):
      selector       the trained QuerySelector: n or ratio if given, else the fixed share it was trained at, else
                     its learned budget;
      selector-states  the same choice, read as PromptDistill reads its own: layers 0..feature_layer-1 run over
                     the full prompt, then only the kept tokens' hidden states (and the query's) go on
                     (`prefill_two_stage`; not in QTSplus);
      promptdistill  PromptDistill as published: the full prompt through the selection layer, then only the kept
                     tokens' hidden states (`prefill_promptdistill`);
      gemfilter      GemFilter: the same scores at the selection layer, then the whole model re-run on the kept
                     tokens and the query, renumbered from position 0 as a shorter prompt;
      qk-top         the same scores, the kept tokens read as the selector's are (original positions): isolates
                     the scoring from how the LM reads what is kept;
      first, last, random   the first, last or a random n context tokens;
      full           no selection.
    `selection_layer`: the layer whose attention scores the context for promptdistill and gemfilter; by default
    the feature layer (for promptdistill at most the second-to-last layer, so that a layer runs on the kept tokens).
    """

    def __init__(self, model, tokenizer, selector=None, feature_layer: int = 1, query_separator: str = " ?",
                 seed: int = 0, default_ratio: float | None = None, selection_layer: int | None = None):
        self.model, self.tokenizer, self.selector = model.eval(), tokenizer, selector
        # A selector trained at a fixed share keeps that share unless told otherwise: its budget head never trained.
        self.default_ratio = default_ratio
        self.feature_layer, self.query_separator = feature_layer, query_separator
        self.selection_layer = selection_layer
        self.generator = torch.Generator().manual_seed(seed)
        if selector is not None:
            selector.eval()

    def layer_for(self, method: str) -> int:
        """The selection layer of promptdistill or gemfilter."""
        if self.selection_layer is not None:
            return self.selection_layer
        depth = len(_base(self.model).get_decoder().layers)
        if method == "promptdistill":  # at least one layer must run on the kept tokens
            return min(self.feature_layer, depth - 2)
        return self.feature_layer  # gemfilter, qk-top

    def encode(self, contexts: list[str], queries: list[str]) -> dict:
        """Padded context/query ids and masks; an empty context or a query as long as the model's position limit
        is a DataError naming the example."""
        device = next(self.model.parameters()).device
        ids = {name: self.tokenizer(texts, add_special_tokens=False)["input_ids"]
               for name, texts in (("context", contexts), ("query", queries))}
        limit = getattr(_base(self.model).config.get_text_config(), "max_position_embeddings", None)
        for index, (context, query) in enumerate(zip(ids["context"], ids["query"])):
            check_selector_lengths(f"example {index}", len(context), len(query), limit, "max_position_embeddings")
        out = {}
        for name, texts in (("context", contexts), ("query", queries)):
            rows = [torch.tensor(row, dtype=torch.long) for row in ids[name]]
            pad = self.tokenizer.pad_token_id
            out[f"{name}_ids"] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad).to(device)
            out[f"{name}_mask"] = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows],
                                                                  batch_first=True).to(device)
        return out

    def _target(self, batch: dict, n: int | None, ratio: float | None) -> torch.Tensor:
        if n is None and ratio is None:
            raise ValueError("a baseline needs n or ratio (how many context tokens to keep)")
        counts = batch["context_mask"].sum(-1).float()
        return torch.full_like(counts, float(n)) if n is not None else torch.ceil(ratio * counts - 1e-6)

    @torch.no_grad()
    def select(self, batch: dict, method: str = "selector", n: int | None = None, ratio: float | None = None):
        """A bool keep mask [B, N] over the context tokens."""
        from tokensieve.selectors.query_selector import position_scores, promptdistill_scores
        from tokensieve.selectors.topn import hard_top_n

        if method not in SELECTION_METHODS:
            raise ValueError(f"method must be one of {', '.join(SELECTION_METHODS)}, got {method!r}")
        mask = batch["context_mask"].bool()
        if method == "full":
            return mask
        if method in ("promptdistill", "selector-states"):  # the selection happens inside their prefill
            return self.prefill(batch, method, n, ratio).keep
        if method == "selector":
            self._check_selector()
            features = lm_features(self.model, batch["context_ids"], batch["context_mask"], batch["query_ids"],
                                   batch["query_mask"], self.feature_layer)
            return self._selector_keep(features.context, batch["context_mask"], features.query, batch["query_mask"],
                                       n, ratio)
        target = self._target(batch, n, ratio)
        if method in ("gemfilter", "qk-top"):
            features = lm_features(self.model, batch["context_ids"], batch["context_mask"], batch["query_ids"],
                                   batch["query_mask"], self.layer_for(method))
            scores = promptdistill_scores(features.q_last, features.context_keys, mask)
        else:
            scores = position_scores(mask, method, self.generator)
        return hard_top_n(scores, target, mask)

    def _check_selector(self) -> None:
        if self.selector is None:
            raise ValueError("methods 'selector' and 'selector-states' need a trained selector")

    def _selector_keep(self, context, context_mask, query, query_mask, n, ratio) -> torch.Tensor:
        if n is None and ratio is None:
            ratio = self.default_ratio
        return self.selector(context.float(), context_mask.bool(), query.float(), query_mask, n=n, ratio=ratio).keep

    @torch.no_grad()
    def prefill(self, batch: dict, method: str = "selector", n: int | None = None,
                ratio: float | None = None) -> Prefill:
        """Select (by `method`) and prefill the LM with what is kept; `Prefill.kv_bytes()` is the cache it leaves."""
        if method == "promptdistill":
            return prefill_promptdistill(self.model, batch, self.layer_for(method), self._target(batch, n, ratio))
        if method == "selector-states":
            self._check_selector()
            query_mask = batch["query_mask"]

            def choose(hidden, captured, context_index):  # the residual stream entering the feature layer
                width, dim = hidden.shape[1], hidden.shape[-1]
                context = hidden.gather(1, context_index[..., None].expand(-1, -1, dim))
                lengths = query_mask.sum(-1, keepdim=True)  # the query fills each row's last columns
                query_index = (width - lengths + torch.arange(query_mask.shape[1], device=hidden.device)).clamp(
                    min=0, max=width - 1)
                query = hidden.gather(1, query_index[..., None].expand(-1, -1, dim))
                return self._selector_keep(context, batch["context_mask"], query, query_mask, n, ratio).bool()

            return prefill_two_stage(self.model, batch, self.feature_layer, choose)
        keep = self.select(batch, method, n, ratio)
        return prefill_reduced(self.model, batch, keep, contiguous_positions=method == "gemfilter")

    @torch.no_grad()
    def answer(self, contexts: list[str], queries: list[str], max_new_tokens: int, method: str = "selector",
               n: int | None = None, ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(generated ids [B, max_new_tokens], keep mask [B, N])."""
        state = self.prefill(self.encode(contexts, queries), method, n, ratio)
        return greedy_decode(self.model, state, max_new_tokens), state.keep
