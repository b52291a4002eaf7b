"""Induction: a random segment of words, then the same segment again.

Every word of the second copy is predictable only by finding the previous occurrence of the word
before it and copying what followed (an induction head). A small share of these rows in a
from-scratch mixture makes the recall tasks (`mqar`, `needle-qa`) learnable in minutes; the words
come from the recall tasks' own vocabularies so the embeddings are shared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.synthetic import mqar, needle_qa
from tokensieve.data.synthetic.words import filler_words

SPLITS = {"train": 5000, "test": 200}


@dataclass
class InductionOptions:
    min_words: int = field(default=16, metadata={"help": "Shortest segment, in words."})
    max_words: int = field(default=64, metadata={"help": "Longest segment, in words."})

    def __post_init__(self):
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words} and {self.max_words}")


OPTIONS = InductionOptions


def vocabulary() -> list[str]:
    """The words segments are drawn from: every word of the mqar and needle-qa tasks."""
    words = filler_words() + mqar.KEYS + mqar.VALUES + list(needle_qa.NAMES) + list(needle_qa.RELATIONS)
    words += [v for values in needle_qa.RELATIONS.values() for v in values]
    return list(dict.fromkeys(words))  # a word may belong to two tasks


def generate(split: str, n: int, seed: int, options: InductionOptions) -> list[dict]:
    """`n` induction rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"induction/{split}/{seed}")
    words = vocabulary()
    rows = []
    for _ in range(n):
        segment = " ".join(rng.choice(words) for _ in range(rng.randint(options.min_words, options.max_words)))
        rows.append({"prompt": f"{segment} ;", "completion": f" {segment}", "task": "induction", "answer": segment})
    return rows
