"""mapped-recall: the second ground of token selection, where fine-tuning must teach the model something new.

The context is noisy-recall's (filler words holding `num_pairs` key-value pairs, "BAD rol"), but the answer to
"? KEY" is not the value bound to KEY: it is that value's partner under one fixed mapping of the value words
(`MAPPING`, a permutation of mqar's values with no fixed point, the same in every split and seed). A model that does
associative recall (the tiny recall base) answers the bound value, which is always wrong here: before fine-tuning
it scores about 0 on the test split, and fine-tuning on clean rows has to teach it the mapping on top of its recall.

In the train split each answer is, independently:
    clean        the partner of the bound value;
    unlearnable  a word drawn uniformly from a pool of 256 (fillers and values): nothing to learn;
    learnable    the asked key itself, echoed back (learnable by a fixed rule, and wrong).
and every training row ends with boilerplate: " ;" and the first `boilerplate_words` words of its prompt, repeated.
The tiny recall base copies a repeated segment from its first word on, so these tokens are ones the model already
predicts; they carry nothing about the task (kind "boilerplate"). The test split asks one question per row, clean,
without boilerplate. Ground truth per row: `noise_spans` ({start, end, kind} character spans of the completion, as
in noisy-recall, plus one "boilerplate" span).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.synthetic import noisy_recall
from tokensieve.data.synthetic.mqar import VALUES

TASK = "mapped-recall"
SPLITS = {"train": 20000, "test": 500}


def _mapping() -> dict[str, str]:
    """value -> partner: a fixed random permutation of the values with no fixed point (a derangement)."""
    rng = random.Random(f"{TASK}/mapping")
    while True:
        partners = list(VALUES)
        rng.shuffle(partners)
        if all(value != partner for value, partner in zip(VALUES, partners)):
            return dict(zip(VALUES, partners))


MAPPING = _mapping()


@dataclass
class Options(noisy_recall.Options):
    """Options of the mapped-recall task: noisy-recall's, and the boilerplate."""

    boilerplate_words: int = field(
        default=6, metadata={"help": "Train split: prompt words repeated at the end of each completion (0: none)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.boilerplate_words <= self.context_words:
            raise ValueError(f"boilerplate_words must be in [0, context_words = {self.context_words}], "
                             f"got {self.boilerplate_words}")


OPTIONS = Options


def generate(split: str, n: int, seed: int, options: Options) -> list[dict]:
    """`n` rows of `split`, deterministic in the arguments; noise and boilerplate only in the train split."""
    return noisy_recall.recall_rows(TASK, split, n, seed, options, answer_of=MAPPING.__getitem__,
                                    boilerplate_words=options.boilerplate_words)
