"""Language-modelling chunks of real prose: each row a `text` of about `prompt_tokens` tokens, consecutive
paragraphs of one corpus split from a random place. For held-out perplexity (a bounded cache against the full one)
and as plain text to mix into training. With `completion_tokens` N the rows also carry `prompt` (the text before its
last N tokens) and `completion` (those tokens), so they mix with prompt/completion rows (a mixture shares one format)
and a trainer scores the continuation of a long context."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.real.retrieval import SPLITS, RealTextOptions, filler, load_tokenizer

__all__ = ["SPLITS", "OPTIONS", "generate"]


@dataclass
class LmTextOptions(RealTextOptions):
    completion_tokens: int = field(default=0, metadata={"help": "Also split each text into prompt and completion, "
                                                                  "the completion its last N tokens (0: text only)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.completion_tokens < self.prompt_tokens:
            raise ValueError(f"completion_tokens must be in [0, prompt_tokens = {self.prompt_tokens}), got "
                             f"{self.completion_tokens}")


OPTIONS = LmTextOptions


def generate(split: str, n: int, seed: int, options: LmTextOptions) -> list[dict]:
    """`n` rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"lm-text/{split}/{seed}")
    tokenizer = load_tokenizer(options.tokenizer)
    rows = []
    for _ in range(n):
        paragraphs, documents = filler(rng, split, options, options.prompt_tokens)
        text = "\n\n".join(paragraphs)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        row = {"text": text, "task": "lm-text", "documents": documents, "tokens": len(encoded["input_ids"])}
        if options.completion_tokens:
            cut = encoded["offset_mapping"][len(encoded["input_ids"]) - options.completion_tokens - 1][1]
            row = {"prompt": text[:cut], "completion": text[cut:], **row}
        rows.append(row)
    return rows
