"""noisy-recall: the proving ground of token selection. Associative recall the tiny recall base can do, with training
answers corrupted in two ways whose every token is known.

A context of filler words holds `num_pairs` key-value pairs ("BAD rol"); the completion answers `train_queries`
questions in a row (" rol ? FEP sud ? ..."), as in mqar. In the train split each answer value is, independently:
    clean        the value bound to the asked key;
    unlearnable  a word drawn uniformly from a pool of 256 (fillers and values): nothing to learn;
    learnable    the asked key itself, echoed back (a distractor copied from the prompt by a fixed rule: easy to
                 learn, and it costs exact match once learned).
The test split asks one question per row and is clean. Ground truth per row: `noise_spans`, a list of
{start, end, kind} character spans of the completion, one per answer value (kind: clean | unlearnable |
learnable); completion characters outside every span (the questions, " ? KEY") are of kind "other".
Tokenization (`tokensieve.data.tokenize`) turns the spans into a per-token `token_kinds` column.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.synthetic.mqar import KEYS, VALUES
from tokensieve.data.synthetic.words import filler_words

TASK = "noisy-recall"
SPLITS = {"train": 20000, "test": 500}
KINDS = ("clean", "unlearnable", "learnable")
NOISE_POOL = tuple(filler_words()) + tuple(VALUES)


@dataclass
class Options:
    """Options of the noisy-recall task."""

    unlearnable_share: float = field(
        default=0.25, metadata={"help": "Train split: probability that an answer value is a random pool word."})
    learnable_share: float = field(
        default=0.35, metadata={"help": "Train split: probability that an answer value is the asked key, echoed."})
    num_pairs: int = field(default=8, metadata={"help": "Key-value pairs in each context."})
    context_words: int = field(default=48, metadata={"help": "Context length in words (filler plus the pairs)."})
    train_queries: int = field(default=8, metadata={"help": "Questions per training row; test rows ask one."})

    def __post_init__(self):
        for name in ("unlearnable_share", "learnable_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.unlearnable_share + self.learnable_share > 1.0:
            raise ValueError(f"unlearnable_share + learnable_share must be <= 1, got "
                             f"{self.unlearnable_share} + {self.learnable_share}")
        if not 1 <= self.num_pairs <= len(KEYS):
            raise ValueError(f"num_pairs must be in [1, {len(KEYS)}], got {self.num_pairs}")
        if self.context_words < 2 * self.num_pairs:
            raise ValueError(f"context_words ({self.context_words}) must be at least 2 * num_pairs ({2 * self.num_pairs})")
        if self.train_queries < 1:
            raise ValueError(f"train_queries must be >= 1, got {self.train_queries}")


OPTIONS = Options


def _context(rng: random.Random, options: Options) -> tuple[list[str], list[tuple[str, str]]]:
    """Context words and the pairs in the order they appear."""
    keys = rng.sample(KEYS, options.num_pairs)
    values = rng.sample(VALUES, options.num_pairs)
    filler = filler_words()
    num_slots = options.context_words - options.num_pairs
    slots = set(rng.sample(range(num_slots), options.num_pairs))
    words, pairs = [], []
    for slot in range(num_slots):
        if slot in slots:
            key, value = keys[len(pairs)], values[len(pairs)]
            pairs.append((key, value))
            words += [key, value]
        else:
            words.append(rng.choice(filler))
    return words, pairs


def _noisy_value(rng: random.Random, options: Options, pairs, index: int) -> tuple[str, str]:
    clean = pairs[index][1]
    draw = rng.random()
    if draw < options.unlearnable_share:
        return rng.choice([w for w in NOISE_POOL if w != clean]), "unlearnable"
    if draw < options.unlearnable_share + options.learnable_share:
        return pairs[index][0], "learnable"
    return clean, "clean"


def generate(split: str, n: int, seed: int, options: Options) -> list[dict]:
    """`n` rows of `split`, deterministic in the arguments; noise only in the train split."""
    rng = random.Random(f"{TASK}/{split}/{seed}")
    train = split == "train"
    rows = []
    for _ in range(n):
        words, pairs = _context(rng, options)
        asked = [rng.randrange(len(pairs)) for _ in range(options.train_queries if train else 1)]
        completion, spans, answers = "", [], []
        for number, index in enumerate(asked):
            value, kind = _noisy_value(rng, options, pairs, index) if train else (pairs[index][1], "clean")
            if number:
                completion += f" ? {pairs[index][0]}"
            completion += " "
            spans.append({"start": len(completion), "end": len(completion) + len(value), "kind": kind})
            completion += value
            answers.append(pairs[index][1])
        rows.append({
            "prompt": " ".join(words) + f" ? {pairs[asked[0]][0]}",
            "completion": completion,
            "task": TASK,
            "answer": answers[0],
            "queries": [pairs[index][0] for index in asked],
            "answers": answers,
            "noise_spans": spans,
        })
    return rows
