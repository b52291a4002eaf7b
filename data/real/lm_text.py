"""Language-modelling chunks of real prose: each row a `text` of about `prompt_tokens` tokens, consecutive
paragraphs of one corpus split from a random place. For held-out perplexity (a bounded cache against the full one)
and as plain text to mix into training."""

from __future__ import annotations

import random

from tokensieve.data.real.retrieval import SPLITS, RealTextOptions, filler, load_tokenizer

__all__ = ["SPLITS", "OPTIONS", "generate"]

OPTIONS = RealTextOptions


def generate(split: str, n: int, seed: int, options: RealTextOptions) -> list[dict]:
    """`n` rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"lm-text/{split}/{seed}")
    tokenizer = load_tokenizer(options.tokenizer)
    rows = []
    for _ in range(n):
        paragraphs, documents = filler(rng, split, options, options.prompt_tokens)
        text = "\n\n".join(paragraphs)
        rows.append({"text": text, "task": "lm-text", "documents": documents,
                     "tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])})
    return rows
