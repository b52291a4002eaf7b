"""Multi-query associative recall (MQAR) with filler.

A context of filler words holds `num_pairs` key-value pairs ("BAD rol") at random places; queries
"? BAD" follow and each answer is the value bound to that key in this context. Keys, values and
filler come from disjoint word lists, so every answer is determined by exactly one pair.

Train rows ask `train_queries` questions one after another in the completion (dense supervision
speeds up learning); queries are drawn with replacement so earlier answers do not give later ones
away by elimination. Test rows ask exactly one question: prompt = context + " ? BAD", completion = " rol".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.synthetic.words import filler_words, syllable_words

SPLITS = {"train": 20000, "test": 500}

# Keys are upper-case and values lower-case three-letter words from two disjoint halves of one list, so
# neither can be mistaken for the other or for the four-letter filler.
KEYS = [w.upper() for w in syllable_words(64)]
VALUES = syllable_words(64, offset=64)


@dataclass
class MqarOptions:
    num_pairs: int = field(default=8, metadata={"help": "Key-value pairs hidden in each context."})
    context_words: int = field(
        default=128, metadata={"help": "Context length in words (filler plus the pairs' words)."}
    )
    train_queries: int = field(
        default=8, metadata={"help": "Questions per training row (with replacement); test rows ask one."}
    )

    def __post_init__(self):
        if not 1 <= self.num_pairs <= len(KEYS):
            raise ValueError(f"num_pairs must be in [1, {len(KEYS)}], got {self.num_pairs}")
        if self.context_words < 2 * self.num_pairs:
            raise ValueError(
                f"context_words ({self.context_words}) must be at least 2 * num_pairs ({2 * self.num_pairs})"
            )
        if self.train_queries < 1:
            raise ValueError(f"train_queries must be >= 1, got {self.train_queries}")


OPTIONS = MqarOptions


def generate(split: str, n: int, seed: int, options: MqarOptions) -> list[dict]:
    """`n` MQAR rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"mqar/{split}/{seed}")
    filler = filler_words()
    num_queries = options.train_queries if split == "train" else 1
    rows = []
    for _ in range(n):
        keys = rng.sample(KEYS, options.num_pairs)
        values = rng.sample(VALUES, options.num_pairs)
        # Choose pair slots among the context's word slots; a pair takes two consecutive words.
        num_slots = options.context_words - options.num_pairs
        pair_slots = sorted(rng.sample(range(num_slots), options.num_pairs))
        order = list(range(options.num_pairs))
        rng.shuffle(order)
        words, pair_positions = [], []
        next_pair = 0
        for slot in range(num_slots):
            if next_pair < options.num_pairs and pair_slots[next_pair] == slot:
                j = order[next_pair]
                pair_positions.append(len(words))
                words += [keys[j], values[j]]
                next_pair += 1
            else:
                words.append(rng.choice(filler))
        binding = dict(zip(keys, values))
        queries = [rng.choice(keys) for _ in range(num_queries)]
        answers = [binding[k] for k in queries]
        completion = f" {answers[0]}" + "".join(f" ? {k} {v}" for k, v in zip(queries[1:], answers[1:]))
        rows.append(
            {
                "prompt": " ".join(words) + f" ? {queries[0]}",
                "completion": completion,
                "task": "mqar",
                "answer": answers[0],
                "queries": queries,
                "answers": answers,
                # Word index of each key in the context, in the order the pairs appear.
                "pair_positions": pair_positions,
            }
        )
    return rows
