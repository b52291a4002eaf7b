"""Pass key in real prose: a five-digit key stated once in a paragraph of its own, then a cue ending in "pass key
is"; the answer is the key (exact match). Ground truth as in `tokensieve.data.real.retrieval`."""

from __future__ import annotations

import random

from tokensieve.data.real.retrieval import SPLITS, RealTextOptions, assemble, number, pick, use_held_out

__all__ = ["SPLITS", "OPTIONS", "generate"]

# Every statement says "the pass key is {v}" and every cue ends in "The pass key is": phrasings differ in the words
# around that core (a 135M model answers by copying what followed the cue's words; with the core reworded too, the
# full cache itself fails, measured: 0.55 on 20 rows, so the test would measure the model, not the cache).
STATEMENTS = {
    "train": ["The pass key is {v}. Remember it. {v} is the pass key.",
              "Please note that the pass key is {v}.",
              "Remember this: the pass key is {v}."],
    "held_out": ["Here is a number worth keeping in mind: the pass key is {v}.",
                 "Do not forget it, the pass key is {v}. I repeat, the pass key is {v}."],
}
CUES = {
    "train": ["What is the pass key? The pass key is",
              "Question: which number is the pass key? Answer: The pass key is"],
    "held_out": ["Now recall the pass key mentioned above. The pass key is",
                 "You were given a pass key earlier in this text. The pass key is"],
}

OPTIONS = RealTextOptions


def generate(split: str, n: int, seed: int, options: RealTextOptions) -> list[dict]:
    """`n` rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"passkey/{split}/{seed}")
    held_out = use_held_out(split, options)
    rows = []
    for _ in range(n):
        key = number(rng, set())
        statement_id, statement = pick(rng, STATEMENTS, held_out)
        cue_id, cue = pick(rng, CUES, held_out)
        row = assemble(rng, split, options, [statement.format(v=key)], 0, cue, key, avoid=(key,))
        rows.append({**row, "task": "passkey", "metric": "exact", "statement_phrasing": statement_id,
                     "cue_phrasing": cue_id})
    return rows
