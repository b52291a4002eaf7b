"""How a frozen causal LM works with a query selector: features for scoring, the reduced input, greedy answers.

    features     the first `layer` decoder layers over [context; query] (no grad): the residual stream entering
                 layer `layer` gives contextual candidate and query features; the same pass yields that layer's
                 queries/keys for PromptDistill-style scoring. The rest of the network is skipped.
    reduced LM   input embeddings of the kept context tokens (times the keep mask, so gradients reach the
                 selector), at their original positions, then the query (and answer) tokens after the full context.
    answers      greedy decoding from that input with a KV cache (positions continue after the query).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from tokensieve.selectors.token_scores import capture_attention_inputs, rotary_queries_keys
from tokensieve.upstream import with_cache


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


@dataclass
class Features:
    context: torch.Tensor  # [B, N, D] residual stream entering layer `layer`, context positions
    query: torch.Tensor  # [B, L, D] same, query positions
    q_last: torch.Tensor  # [B, H, d] layer `layer`'s query of the last query token (RoPE applied)
    context_keys: torch.Tensor  # [B, H, N, d] layer `layer`'s keys of the context tokens


@torch.no_grad()
def lm_features(model, context_ids, context_mask, query_ids, query_mask, layer: int) -> Features:
    """Run decoder layers 0 .. layer-1 over [context (right-padded); query (right-padded)] and stop."""
    decoder = _base(model).get_decoder()
    if not 1 <= layer < len(decoder.layers):
        raise ValueError(f"feature layer must be in [1, {len(decoder.layers) - 1}], got {layer}")
    ids = torch.cat([context_ids, query_ids], dim=1)
    mask = torch.cat([context_mask, query_mask], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    captured = {}

    def grab_residual(module, args, kwargs):
        captured["residual"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    attention = decoder.layers[layer].self_attn
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


@torch.no_grad()
def greedy_answers(model, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation [B, max_new_tokens] of left-padded `reduced_inputs(..., left_pad=True)`."""
    embed = _base(model).get_input_embeddings()
    cache = DynamicCache(config=_base(model).config)
    mask, positions = inputs["attention_mask"], inputs["position_ids"]
    out = model(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask, position_ids=positions,
                use_cache=True, **with_cache(model, cache))
    next_position = positions.max(dim=-1, keepdim=True).values + 1
    tokens = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(inputs_embeds=embed(token), attention_mask=mask, position_ids=next_position,
                    use_cache=True, **with_cache(model, cache))
        next_position = next_position + 1
    return torch.cat(tokens, dim=1)


SELECTION_METHODS = ("selector", "promptdistill", "first", "last", "random", "full")


class SelectorPipeline:
    """Context + query -> kept context tokens -> greedy answer, for a trained selector or a training-free baseline.

    methods: "selector" (the trained QuerySelector: n or ratio if given, else the fixed share it was trained at,
    else its learned budget), "promptdistill"
    (head-mean q_last . k_j at the feature layer, avg-pooled), "first", "last", "random", "full" (no selection).
    """

    def __init__(self, model, tokenizer, selector=None, feature_layer: int = 1, query_separator: str = " ?",
                 seed: int = 0, default_ratio: float | None = None):
        self.model, self.tokenizer, self.selector = model.eval(), tokenizer, selector
        # A selector trained at a fixed share keeps that share unless told otherwise: its budget head never trained.
        self.default_ratio = default_ratio
        self.feature_layer, self.query_separator = feature_layer, query_separator
        self.generator = torch.Generator().manual_seed(seed)
        if selector is not None:
            selector.eval()

    def encode(self, contexts: list[str], queries: list[str]) -> dict:
        """Padded context/query ids and masks; an empty context or a query as long as the model's position limit
        is a DataError naming the example."""
        from tokensieve.trainers.query_selector import check_selector_lengths

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

    @torch.no_grad()
    def select(self, batch: dict, method: str = "selector", n: int | None = None, ratio: float | None = None):
        """A bool keep mask [B, N] over the context tokens."""
        from tokensieve.selectors.query_selector import position_scores, promptdistill_scores
        from tokensieve.selectors.topn import hard_top_n

        mask = batch["context_mask"].bool()
        if method == "full":
            return mask
        if method == "selector":
            if self.selector is None:
                raise ValueError("method 'selector' needs a trained selector")
            if n is None and ratio is None:
                ratio = self.default_ratio
            features = lm_features(self.model, batch["context_ids"], batch["context_mask"], batch["query_ids"],
                                   batch["query_mask"], self.feature_layer)
            return self.selector(features.context.float(), mask, features.query.float(), batch["query_mask"],
                                 n=n, ratio=ratio).keep
        counts = mask.sum(-1).float()
        target = torch.full_like(counts, float(n)) if n is not None else torch.ceil(ratio * counts - 1e-6)
        if method == "promptdistill":
            features = lm_features(self.model, batch["context_ids"], batch["context_mask"], batch["query_ids"],
                                   batch["query_mask"], self.feature_layer)
            scores = promptdistill_scores(features.q_last, features.context_keys, mask)
        elif method in ("first", "last", "random"):
            scores = position_scores(mask, method, self.generator)
        else:
            raise ValueError(f"method must be one of {', '.join(SELECTION_METHODS)}, got {method!r}")
        return hard_top_n(scores, target, mask)

    @torch.no_grad()
    def answer(self, contexts: list[str], queries: list[str], max_new_tokens: int, method: str = "selector",
               n: int | None = None, ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(generated ids [B, max_new_tokens], keep mask [B, N])."""
        batch = self.encode(contexts, queries)
        keep = self.select(batch, method, n, ratio)
        inputs = reduced_inputs(self.model, batch["context_ids"], batch["context_mask"], keep, batch["query_ids"],
                                batch["query_mask"], left_pad=True)
        inputs.pop("labels")
        return greedy_answers(self.model, inputs, max_new_tokens), keep
