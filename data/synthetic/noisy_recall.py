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


def check_noise_shares(unlearnable_share: float, learnable_share: float) -> None:
    """Each share in [0, 1], and together at most 1 (the rest of the answers are clean)."""
    for name, value in (("unlearnable_share", unlearnable_share), ("learnable_share", learnable_share)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if unlearnable_share + learnable_share > 1.0:
        raise ValueError(f"unlearnable_share + learnable_share must be <= 1, got {unlearnable_share} + "
                         f"{learnable_share}")


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
        check_noise_shares(self.unlearnable_share, self.learnable_share)
        if not 1 <= self.num_pairs <= len(KEYS):
            raise ValueError(f"num_pairs must be in [1, {len(KEYS)}], got {self.num_pairs}")
        if self.context_words < 2 * self.num_pairs:
            raise ValueError(f"context_words ({self.context_words}) must be at least 2 * num_pairs ({2 * self.num_pairs})")
        if self.train_queries < 1:
            raise ValueError(f"train_queries must be >= 1, got {self.train_queries}")


OPTIONS = Options


def context_pairs(rng: random.Random, num_pairs: int, context_words: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Context words (filler holding `num_pairs` key-value pairs) and the pairs in the order they appear."""
    keys = rng.sample(KEYS, num_pairs)
    values = rng.sample(VALUES, num_pairs)
    filler = filler_words()
    num_slots = context_words - num_pairs
    slots = set(rng.sample(range(num_slots), num_pairs))
    words, pairs = [], []
    for slot in range(num_slots):
        if slot in slots:
            key, value = keys[len(pairs)], values[len(pairs)]
            pairs.append((key, value))
            words += [key, value]
        else:
            words.append(rng.choice(filler))
    return words, pairs


def _noisy_answer(rng: random.Random, options: Options, key: str, right: str) -> tuple[str, str]:
    """A training answer and its kind: the right one, a random pool word, or the asked key echoed."""
    draw = rng.random()
    if draw < options.unlearnable_share:
        return rng.choice([w for w in NOISE_POOL if w != right]), "unlearnable"
    if draw < options.unlearnable_share + options.learnable_share:
        return key, "learnable"
    return right, "clean"


def recall_rows(task: str, split: str, n: int, seed: int, options: Options, answer_of=None,
                boilerplate_words: int = 0) -> list[dict]:
    """`n` rows of a noisy recall task: the right answer to "? KEY" is `answer_of(bound value)` (default: the value
    itself); in the train split each answer is noised as `options` say and, with `boilerplate_words`, the completion
    ends with " ; " and that many of the prompt's first words (a "boilerplate" span)."""
    rng = random.Random(f"{task}/{split}/{seed}")
    train = split == "train"
    rows = []
    for _ in range(n):
        words, pairs = context_pairs(rng, options.num_pairs, options.context_words)
        asked = [rng.randrange(len(pairs)) for _ in range(options.train_queries if train else 1)]
        completion, spans, answers = "", [], []
        for number, index in enumerate(asked):
            key, value = pairs[index]
            right = answer_of(value) if answer_of else value
            answer, kind = _noisy_answer(rng, options, key, right) if train else (right, "clean")
            if number:
                completion += f" ? {key}"
            completion += " "
            spans.append({"start": len(completion), "end": len(completion) + len(answer), "kind": kind})
            completion += answer
            answers.append(right)
        if train and boilerplate_words:
            completion += " ; "
            tail = " ".join(words[:boilerplate_words])
            spans.append({"start": len(completion), "end": len(completion) + len(tail), "kind": "boilerplate"})
            completion += tail
        rows.append({
            "prompt": " ".join(words) + f" ? {pairs[asked[0]][0]}",
            "completion": completion,
            "task": task,
            "answer": answers[0],
            "queries": [pairs[index][0] for index in asked],
            "answers": answers,
            "noise_spans": spans,
        })
    return rows


def generate(split: str, n: int, seed: int, options: Options) -> list[dict]:
    """`n` rows of `split`, deterministic in the arguments; noise only in the train split."""
    return recall_rows(TASK, split, n, seed, options)
