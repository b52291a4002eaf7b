"""How well a token scorer separates clean tokens from known noise: selection scored against ground truth.

A dataset with ground truth (e.g. noisy-recall) carries a kind per response token. Given a scorer's per-token score
(higher: more worth training on) and its weights (0/1 for a selection), this reports per kind the share of tokens
kept (weight > 0) and their mean weight, and for each noise kind the AUROC of the score for clean vs that kind:
the probability that a random clean token scores above a random noise token (ties count half). 1.0 separates
perfectly, 0.5 is chance, below 0.5 prefers the noise. This measures the selector itself, whatever the model then
learns from it.
"""

from __future__ import annotations

import torch

# Kind ids as stored in a dataset's `token_kinds` column (one per response token, written by the tokenization from
# the rows' `noise_spans`): 0 is a token outside the response (never scored).
KINDS_COLUMN = "token_kinds"
# unlearnable: a random word, nothing to learn; learnable: wrong by a fixed rule the model can learn; boilerplate:
# tokens the model already predicts that carry nothing about the task (mapped-recall's repeated prompt words).
KINDS = ("other", "clean", "unlearnable", "learnable", "boilerplate")
KIND_IDS = {name: index + 1 for index, name in enumerate(KINDS)}
NOISE_KINDS = ("unlearnable", "learnable", "boilerplate")


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(a positive scores above a negative) + P(tie) / 2, over all pairs; None if either side is empty."""
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    positive, negative = positive.double().flatten(), negative.double().flatten()
    # Mann-Whitney U from the ranks of the negatives among the sorted positives: O((m + n) log m), no m x n matrix.
    ordered = positive.sort().values
    below = torch.searchsorted(ordered, negative, right=False)  # positives strictly below each negative
    not_above = torch.searchsorted(ordered, negative, right=True)  # positives below or equal
    above = positive.numel() - not_above
    ties = not_above - below
    return float((above.double() + 0.5 * ties.double()).sum() / (positive.numel() * negative.numel()))


def selection_quality(scores: torch.Tensor, weights: torch.Tensor, kinds: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, float]:
    """Per kind k present among the masked tokens: `tokens_k`, `kept_k` (share with weight > 0), `weight_k` (mean
    weight); per noise kind n present with clean tokens: `auroc_clean_vs_n` of `scores`. All [B, T] aligned."""
    if not (scores.shape == weights.shape == kinds.shape == mask.shape):
        raise ValueError(f"scores {tuple(scores.shape)}, weights {tuple(weights.shape)}, kinds {tuple(kinds.shape)} "
                         f"and mask {tuple(mask.shape)} must have one shape")
    result: dict[str, float] = {}
    scores, weights = scores.detach().float(), weights.detach().float()
    for name, kind in KIND_IDS.items():
        where = mask & (kinds == kind)
        count = int(where.sum())
        if count:
            result[f"tokens_{name}"] = float(count)
            result[f"kept_{name}"] = float((weights[where] > 0).float().mean())
            result[f"weight_{name}"] = float(weights[where].mean())
    clean = scores[mask & (kinds == KIND_IDS["clean"])]
    for name in NOISE_KINDS:
        value = auroc(clean, scores[mask & (kinds == KIND_IDS[name])])
        if value is not None:
            result[f"auroc_clean_vs_{name}"] = value
    return result


def kinds_from_spans(offsets: list[tuple[int, int]], completion_start: int, spans: list) -> list[int]:
    """Kind id per token from character `offsets` of the full text, the completion's first character, and spans
    {start, end, kind} relative to the completion. Tokens before the completion get 0, completion tokens outside
    every span "other"."""
    kinds = []
    for start, end in offsets:
        if end <= completion_start:
            kinds.append(0)
            continue
        kind = KIND_IDS["other"]
        for span in spans:
            span_start, span_end, name = span["start"], span["end"], span["kind"]
            if start < completion_start + span_end and end > completion_start + span_start:
                if name not in KIND_IDS:
                    raise ValueError(f"unknown token kind {name!r} in noise_spans; expected one of {', '.join(KINDS)}")
                kind = KIND_IDS[name]
                break
        kinds.append(kind)
    return kinds
