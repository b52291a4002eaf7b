"""Several named codes in real prose (each a five-digit number stated in a paragraph of its own at its own depth);
the cue asks for one by name; the answer is its code (exact match). The other codes are `distractors`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.real.retrieval import SPLITS, RealTextOptions, assemble, number, pick, use_held_out

__all__ = ["SPLITS", "OPTIONS", "generate"]

NAMES = ("harbour gate", "archive room", "north tower", "garden shed", "wine cellar", "boat house", "east wing",
         "music room", "clock tower", "stable door", "library safe", "workshop", "attic", "chapel", "greenhouse",
         "boiler room")
# Every statement says "the code for the {n} is {v}" and every cue ends in "The code for the {n} is": phrasings differ
# in the words around that core (see passkey.py).
STATEMENTS = {
    "train": ["The code for the {n} is {v}.",
              "Remember that the code for the {n} is {v}.",
              "For the record, the code for the {n} is {v}."],
    "held_out": ["Only the staff know that the code for the {n} is {v}.",
                 "As agreed, the code for the {n} is {v}; keep it safe."],
}
CUES = {
    "train": ["What is the code for the {n}? The code for the {n} is",
              "Question: which code opens the {n}? Answer: The code for the {n} is"],
    "held_out": ["Recall the code of the {n} given above. The code for the {n} is",
                 "Someone asks for the {n} code. The code for the {n} is"],
}


@dataclass
class NamedKeysOptions(RealTextOptions):
    num_keys: int = field(default=4, metadata={"help": "Named codes in each prompt; one is asked."})

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_keys <= len(NAMES):
            raise ValueError(f"num_keys must be in [1, {len(NAMES)}], got {self.num_keys}")


OPTIONS = NamedKeysOptions


def generate(split: str, n: int, seed: int, options: NamedKeysOptions) -> list[dict]:
    """`n` rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"named-keys/{split}/{seed}")
    held_out = use_held_out(split, options)
    rows = []
    for _ in range(n):
        names = rng.sample(NAMES, options.num_keys)
        taken: set[str] = set()
        codes = [number(rng, taken) for _ in names]
        statements = []
        for name, code in zip(names, codes):
            statement_id, statement = pick(rng, STATEMENTS, held_out)
            statements.append(statement.format(n=name, v=code))
        asked = rng.randrange(len(names))
        cue_id, cue = pick(rng, CUES, held_out)
        row = assemble(rng, split, options, statements, asked, cue.format(n=names[asked]), codes[asked],
                       avoid=tuple(codes))
        rows.append({**row, "task": "named-keys", "metric": "exact", "asked_name": names[asked],
                     "cue_phrasing": cue_id, "held_out_phrasings": held_out})
    return rows
