"""Facts about people in real prose: a few short statements ("Nora Lindqvist moved to Porto last spring."), each
about another person, placed at random depths; the cue asks one person's fact and the answer (a city, an
instrument, a place in a house: ordinary words, not rare tokens) is copied from its statement. Scored by
"contains": the answer must appear in the generation (the model may phrase the start differently)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.data.real.retrieval import SPLITS, RealTextOptions, assemble, pick, use_held_out

__all__ = ["SPLITS", "OPTIONS", "generate"]

FIRST = ("Nora Maria Tomas Ingrid Pavel Amara Lucia Omar Hannah Felix Sofia Mateo Elena Jonas Priya Kofi Greta Ivan "
         "Leila Samuel Yuki Anton Clara Diego").split()
LAST = ("Lindqvist Alvarez Novak Okafor Brennan Castillo Haddad Moreau Petrov Sato Fischer Quinn Ferreira Kowalski "
        "Andersen Mensah Rossi Takahashi Dubois Nakamura").split()
# kind -> (values, statement phrasings, cue phrasings); {p} the person, {v} the value. Each cue ends in the words
# that precede the value in every statement of its kind ("{p} moved to"); phrasings differ around them (passkey.py).
RELATIONS = {
    "city": (
        "Lisbon Oslo Nairobi Montreal Kyoto Valparaiso Edinburgh Krakow Seville Hobart Tallinn Marrakesh Dublin "
        "Porto Zurich Bergen".split(),
        {"train": ["{p} moved to {v} last spring.", "Last spring, after a long winter, {p} moved to {v}."],
         "held_out": ["After many years of planning, {p} moved to {v} with the whole family."]},
        {"train": ["Where did {p} go? {p} moved to", "Question: which city? Answer: {p} moved to"],
         "held_out": ["Recall the city named above. {p} moved to"]},
    ),
    "instrument": (
        "cello trumpet harp oboe banjo clarinet accordion violin flute trombone saxophone ukulele".split(),
        {"train": ["{p} plays the {v} in a small band.", "Every evening, {p} plays the {v}."],
         "held_out": ["On weekends {p} plays the {v} at the town hall."]},
        {"train": ["What instrument does {p} play? {p} plays the",
                   "Question: which instrument? Answer: {p} plays the"],
         "held_out": ["Think of the instrument mentioned above. {p} plays the"]},
    ),
    "hiding place": (
        ["blue teapot", "old piano", "bottom drawer", "biscuit tin", "wooden chest", "flower pot", "coat pocket",
         "bread box", "music box", "tool shed"],
        {"train": ["{p} hid the spare key inside the {v}.", "To be safe, {p} hid the spare key inside the {v}."],
         "held_out": ["Last week {p} hid the spare key inside the {v}, just in case."]},
        {"train": ["Where is the spare key? {p} hid the spare key inside the",
                   "Question: where is it? Answer: {p} hid the spare key inside the"],
         "held_out": ["Recall where the spare key is. {p} hid the spare key inside the"]},
    ),
}


@dataclass
class FactsOptions(RealTextOptions):
    num_facts: int = field(default=3, metadata={"help": "Facts in each prompt, about different people; one asked."})

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_facts <= 8:
            raise ValueError(f"num_facts must be in [1, 8], got {self.num_facts}")


OPTIONS = FactsOptions


def generate(split: str, n: int, seed: int, options: FactsOptions) -> list[dict]:
    """`n` rows for `split`, deterministic in (split, n, seed, options)."""
    rng = random.Random(f"facts/{split}/{seed}")
    held_out = use_held_out(split, options)
    kinds = sorted(RELATIONS)
    rows = []
    for _ in range(n):
        people = [f"{first} {last}" for first, last in zip(rng.sample(FIRST, options.num_facts),
                                                           rng.sample(LAST, options.num_facts))]
        facts, statements, used = [], [], set()
        for person in people:
            kind = rng.choice(kinds)
            value = rng.choice([v for v in RELATIONS[kind][0] if v not in used])  # each answer written once
            used.add(value)
            _, statement = pick(rng, RELATIONS[kind][1], held_out)
            facts.append((person, kind, value))
            statements.append(statement.format(p=person, v=value))
        asked = rng.randrange(len(people))
        person, kind, value = facts[asked]
        cue_id, cue = pick(rng, RELATIONS[kind][2], held_out)
        row = assemble(rng, split, options, statements, asked, cue.format(p=person), value,
                       avoid=tuple(people) + (value,))
        rows.append({**row, "task": "facts", "metric": "contains", "kind": kind, "person": person,
                     "cue_phrasing": cue_id, "held_out_phrasings": held_out})
    return rows
