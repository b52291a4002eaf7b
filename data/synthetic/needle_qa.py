"""Needle QA: a long context of short facts, then one question whose answer depends on one fact.

Each fact is predicate-first, "<relation> <name> <value> ." ("owns nora lamp ."); every name appears
in at most one fact of a context, and the relations share one small vocabulary each, so the other
facts are real distractors. The question repeats the relation and the name: prompt = facts +
" ? owns nora", completion = " lamp". (With "nora owns lamp ." the answer sits two words after the
name, and a two-layer model learns that match far more slowly.) `needle_index` records which fact answers the question. Training rows
ask `train_questions` questions in a row (drawn with replacement, as in `mqar`), for denser
supervision; test rows ask one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SPLITS = {"train": 20000, "test": 500}

NAMES = (
    "ada alan alma amos anna arlo ben bess carl cleo cora dale dana dean dora drew eden egon elsa emil "
    "enzo esme eve finn flor gene gina gus hana hugo ida igor ines ira ivan jack jane jude june kai kara "
    "kurt lara leo lena lily lou luca lulu mae mara max mila milo nell nico nina noah nora olga omar otto "
    "owen paul pia rae remy rita rosa ross ruby ruth sam sara saul tara ted tess theo tina toby uma vera "
    "vic wade will xena yara yuri zack zara zoe"
).split()

RELATIONS = {
    "owns": "lamp kite drum boat sofa vase clock bike desk fork rope harp bell coat tent mask".split(),
    "likes": "tea rice figs soup plum kale bread jam pear corn lime nuts milk pie yam beans".split(),
    "visits": "oslo rome lima kyiv doha riga bern cairo quito dakar hanoi baku lagos perth turin sofia".split(),
    "plays": "chess golf polo rugby darts bingo poker tennis squash hockey cricket bridge judo karate curling bowls".split(),
}


@dataclass
class NeedleQaOptions:
    num_facts: int = field(default=32, metadata={"help": "Facts in each context (4 words each)."})
    train_questions: int = field(
        default=8, metadata={"help": "Questions per training row (with replacement); test rows ask one."}
    )

    def __post_init__(self):
        if not 1 <= self.num_facts <= len(NAMES):
            raise ValueError(f"num_facts must be in [1, {len(NAMES)}], got {self.num_facts}")
        if self.train_questions < 1:
            raise ValueError(f"train_questions must be >= 1, got {self.train_questions}")


OPTIONS = NeedleQaOptions


def generate(split: str, n: int, seed: int, options: NeedleQaOptions) -> list[dict]:
    """`n` needle-QA rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"needle-qa/{split}/{seed}")
    relations = sorted(RELATIONS)
    rows = []
    for _ in range(n):
        names = rng.sample(NAMES, options.num_facts)
        facts = []
        for name in names:
            relation = rng.choice(relations)
            facts.append((name, relation, rng.choice(RELATIONS[relation])))
        num_questions = options.train_questions if split == "train" else 1
        asked = [rng.randrange(options.num_facts) for _ in range(num_questions)]
        needle_index = asked[0]
        name, relation, value = facts[needle_index]
        context = " ".join(f"{r} {n} {v} ." for n, r, v in facts)
        # Later questions of a training row follow the first answer: " lamp ? likes bob tea ? ...".
        more = "".join(f" ? {facts[i][1]} {facts[i][0]} {facts[i][2]}" for i in asked[1:])
        rows.append(
            {
                "prompt": f"{context} ? {relation} {name}",
                "completion": f" {value}{more}",
                "task": "needle-qa",
                "answer": value,
                "needle_index": needle_index,
                # Word index of the needle fact's first word in the context (4 words per fact).
                "needle_position": 4 * needle_index,
            }
        )
    return rows
