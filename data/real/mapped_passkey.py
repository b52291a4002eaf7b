"""mapped-passkey: the second ground of token selection on real prose, where fine-tuning must teach a new skill.

A pass key is stated once in real prose (the passkey task's statements); the cue asks for the key with every digit moved
up by one (9 becomes 0): "58213" -> "69324". A model that copies the key (SmolLM2-135M-Instruct does, 0.95 at 1K
tokens) answers the key itself, which is wrong here; fine-tuning on clean rows has to teach the digit mapping on
top of the copying. The answer is scored by exact match.

In the train split each answer is, independently:
    clean        the key with every digit + 1 (mod 10);
    unlearnable  five random digits: nothing to learn;
    learnable    the key with every digit - 1 (mod 10): a rule as easy to learn as the clean one, and wrong;
and every training completion ends with boilerplate the model already predicts: the key's statement repeated,
" (The pass key is 58213.)", copied from the prompt. The test split is clean and has no boilerplate. Ground truth
per row: `noise_spans`, {start, end, kind} character spans of the completion (kinds as in noisy-recall plus
"boilerplate"), and the retrieval spans of `tokensieve.data.real.retrieval`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.real.passkey import STATEMENTS
from tokensieve.data.real.retrieval import SPLITS, RealTextOptions, assemble, number, pick, use_held_out
from tokensieve.data.synthetic.noisy_recall import check_noise_shares

__all__ = ["SPLITS", "OPTIONS", "generate", "shift"]

CUES = {
    "train": ["What is the pass key with every digit moved up by one? It is",
              "Question: take the pass key and add one to each digit (9 becomes 0). Answer:",
              "Add one to every digit of the pass key. The new number is",
              "Increase each digit of the pass key by one, with 9 turning into 0. Result:",
              "If every digit of the pass key goes up by one, the pass key becomes",
              "Write the pass key again, but with each digit one higher:"],
    "held_out": ["Now recall the pass key mentioned above and raise each of its digits by one. The result is",
                 "You were given a pass key earlier in this text. Shift every digit of it up by one:"],
}


def shift(key: str, by: int) -> str:
    """Every digit of `key` plus `by`, modulo 10."""
    return "".join(str((int(digit) + by) % 10) for digit in key)


@dataclass
class Options(RealTextOptions):
    unlearnable_share: float = field(
        default=0.25, metadata={"help": "Train split: probability that an answer is five random digits."})
    learnable_share: float = field(
        default=0.35, metadata={"help": "Train split: probability that an answer is the key with each digit - 1."})
    boilerplate: bool = field(
        default=True, metadata={"help": "Train split: end each completion with the key's statement repeated."})

    def __post_init__(self):
        super().__post_init__()
        check_noise_shares(self.unlearnable_share, self.learnable_share)


OPTIONS = Options


def _answer(rng: random.Random, options: Options, key: str) -> tuple[str, str]:
    """A training answer and its kind."""
    draw = rng.random()
    if draw < options.unlearnable_share:
        while True:
            noise = "".join(rng.choice("0123456789") for _ in key)
            if noise != shift(key, 1):
                return noise, "unlearnable"
    if draw < options.unlearnable_share + options.learnable_share:
        return shift(key, -1), "learnable"
    return shift(key, 1), "clean"


def generate(split: str, n: int, seed: int, options: Options) -> list[dict]:
    """`n` rows for `split`, deterministic in (split, n, seed, options); noise and boilerplate only in train."""
    rng = random.Random(f"mapped-passkey/{split}/{seed}")
    held_out = use_held_out(split, options)
    train = split == "train"
    rows = []
    for _ in range(n):
        key = number(rng, set())
        statement_id, statement = pick(rng, STATEMENTS, held_out)
        cue_id, cue = pick(rng, CUES, held_out)
        target = shift(key, 1)
        row = assemble(rng, split, options, [statement.format(v=key)], 0, cue, key, avoid=(key, target))
        answer, kind = _answer(rng, options, key) if train else (target, "clean")
        completion = " " + answer
        spans = [{"start": 1, "end": len(completion), "kind": kind}]
        if train and options.boilerplate:
            tail = f"The pass key is {key}."
            completion += " ("
            spans.append({"start": len(completion), "end": len(completion) + len(tail), "kind": "boilerplate"})
            completion += tail + ")"
        rows.append({**row, "completion": completion, "answer": target, "key": key, "noise_spans": spans,
                     "task": "mapped-passkey", "metric": "exact", "statement_phrasing": statement_id,
                     "cue_phrasing": cue_id})
    return rows
