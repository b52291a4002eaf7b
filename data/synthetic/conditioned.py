"""conditioned: answers that mix context-dependent words with generic words, for token weighting (PRIOR-style).

The prompt carries a context of `field=value` pairs and a question naming some fields; the completion states them:

    prompt:     "context : colour=red animal=fox city=rome ; tell the animal and the colour"
    completion: " the animal is fox and the colour is red ."

A reference model that sees `prompt_without_context` ("tell the animal and the colour") can predict every generic
word of the completion but none of the values; `dependent_positions` gives the word indices of the completion that
were copied from the context (here [3, 7]).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.errors import TokensieveError

TASK = "conditioned"
SPLITS = {"train": 20000, "test": 500}

FIELDS = {
    "colour": ("red", "blue", "green", "gold", "grey", "pink", "teal", "black", "white", "brown"),
    "animal": ("fox", "owl", "cat", "dog", "bear", "wolf", "hare", "seal", "crow", "deer"),
    "city": ("rome", "oslo", "lima", "kyiv", "doha", "riga", "bern", "cairo", "delhi", "paris"),
    "food": ("bread", "rice", "soup", "cake", "plum", "pear", "corn", "fig", "egg", "tea"),
    "tool": ("saw", "axe", "drill", "rake", "hoe", "file", "awl", "vice", "plane", "wrench"),
    "metal": ("iron", "tin", "zinc", "lead", "copper", "silver", "nickel", "brass", "steel", "bronze"),
}


@dataclass
class Options:
    """Options of the conditioned task."""

    min_fields: int = field(default=3, metadata={"help": "Fewest field=value pairs in a context."})
    max_fields: int = field(default=5, metadata={"help": f"Most field=value pairs in a context (<= {len(FIELDS)})."})
    max_asked: int = field(default=3, metadata={"help": "Most fields a question asks for (at least one)."})

    def __post_init__(self):
        if not 1 <= self.min_fields <= self.max_fields <= len(FIELDS):
            raise TokensieveError(
                f"conditioned: need 1 <= min_fields <= max_fields <= {len(FIELDS)}, "
                f"got {self.min_fields}, {self.max_fields}."
            )
        if self.max_asked < 1:
            raise TokensieveError(f"conditioned: max_asked must be >= 1, got {self.max_asked}.")


OPTIONS = Options


def generate(split: str, n: int, seed: int, options: Options) -> list[dict]:
    """Return `n` rows with context, prompt_without_context and dependent_positions. Deterministic in the arguments."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        names = rng.sample(sorted(FIELDS), rng.randint(options.min_fields, options.max_fields))
        values = {name: rng.choice(FIELDS[name]) for name in names}
        context = " ".join(f"{name}={value}" for name, value in values.items())
        asked = rng.sample(names, rng.randint(1, min(options.max_asked, len(names))))
        question = "tell " + " and ".join(f"the {name}" for name in asked)
        words, dependent_positions = [], []
        for number, name in enumerate(asked):
            if number:
                words.append("and")
            words += ["the", name, "is"]
            dependent_positions.append(len(words))
            words.append(values[name])
        words.append(".")
        rows.append(
            {
                "prompt": f"context : {context} ; {question}",
                "completion": " " + " ".join(words),
                "task": TASK,
                "context": context,
                "prompt_without_context": question,
                "dependent_positions": dependent_positions,
            }
        )
    return rows
