"""noisy-sft: short instructions with exact answers, whose training responses carry known noise and boilerplate.

Kinds: sort a list of words, reverse a list, add two numbers, copy a named field from a small record:

    prompt: "record : name=fox color=red size=big ; copy color"      completion: " red"

In the train split each answer word is replaced, with probability `noise_fraction`, by a word from a separate
noise vocabulary, and a share `boilerplate_fraction` of responses is wrapped in a fixed prefix and suffix
(" sure , here it is : red done ."). Token selection methods should learn to ignore both. The test split is clean.
Ground truth per row: `answer` (clean), `noisy_positions` (word indices into the completion), `has_boilerplate`,
`kind`. The whole task uses about 300 distinct words, so a byte-level BPE with 1024-2048 tokens learns them whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokensieve.errors import TokensieveError

TASK = "noisy-sft"
SPLITS = {"train": 20000, "test": 500}
KINDS = ("sort", "reverse", "add", "copy")

WORDS = (
    "ant bat bear bee bird boar bull cat cod cow crab crow deer dog dove duck eel elk emu fox frog goat gull hare "
    "hawk hen horse lamb lark lion lynx mole moth mouse mule newt owl ox panda pig pony puma ram rat rook seal "
    "shark sheep slug snail snake swan tiger toad trout wasp whale wolf worm yak zebra apple bean bread cake "
    "corn egg fig grape honey lemon lime melon nut oat olive onion pea pear plum rice salt soup tea yam"
).split()
RECORD = {
    "name": ("ada", "bo", "cy", "dee", "eli", "flo", "gus", "hal", "ivy", "jo", "kai", "lu"),
    "color": ("red", "blue", "green", "gold", "grey", "pink", "teal", "tan", "black", "white"),
    "size": ("tiny", "small", "big", "huge", "wide", "tall", "short", "long"),
    "shape": ("round", "square", "flat", "oval", "star", "cube", "cone", "ring"),
    "city": ("rome", "oslo", "lima", "kyiv", "doha", "baku", "riga", "bern", "cairo", "delhi"),
}
# Noise words share no word with any clean answer, so a replaced word always differs from the clean one.
NOISE_WORDS = (
    "zork blip snarf quux wibble gloop frob plugh xyzzy fnord zot bleep kludge glitch derp meh nope zap boing "
    "splat whoosh klunk gronk fizz buzz womp yikes blorp squee"
).split()
BOILERPLATE_PREFIX = "sure , here it is :".split()
BOILERPLATE_SUFFIX = "done .".split()


@dataclass
class Options:
    """Options of the noisy-sft task."""

    noise_fraction: float = field(
        default=0.3, metadata={"help": "Train split: probability that each answer word is replaced by a noise word."}
    )
    boilerplate_fraction: float = field(
        default=0.3, metadata={"help": "Train split: share of responses wrapped in a fixed boilerplate prefix/suffix."}
    )
    min_items: int = field(default=3, metadata={"help": "Fewest words in a sort/reverse list."})
    max_items: int = field(default=6, metadata={"help": "Most words in a sort/reverse list."})
    max_operand: int = field(default=49, metadata={"help": "Largest number added by the `add` kind."})

    def __post_init__(self):
        for name in ("noise_fraction", "boilerplate_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TokensieveError(f"noisy-sft: {name} must be in [0, 1], got {getattr(self, name)}.")
        if not 1 <= self.min_items <= self.max_items <= len(WORDS):
            raise TokensieveError(
                f"noisy-sft: need 1 <= min_items <= max_items <= {len(WORDS)}, got {self.min_items}, {self.max_items}."
            )
        if self.max_operand < 0:
            raise TokensieveError(f"noisy-sft: max_operand must be >= 0, got {self.max_operand}.")


OPTIONS = Options


def generate(split: str, n: int, seed: int, options: Options) -> list[dict]:
    """Return `n` rows of the task; noise and boilerplate only in the train split. Deterministic in the arguments."""
    rng = random.Random(seed)
    noisy = split == "train"
    rows = []
    for _ in range(n):
        kind = rng.choice(KINDS)
        prompt, answer = _make_example(kind, rng, options)
        words = list(answer)
        noisy_positions = []
        has_boilerplate = noisy and rng.random() < options.boilerplate_fraction
        offset = len(BOILERPLATE_PREFIX) if has_boilerplate else 0
        if noisy:
            for index in range(len(words)):
                if rng.random() < options.noise_fraction:
                    words[index] = rng.choice(NOISE_WORDS)
                    noisy_positions.append(offset + index)
        if has_boilerplate:
            words = BOILERPLATE_PREFIX + words + BOILERPLATE_SUFFIX
        rows.append(
            {
                "prompt": prompt,
                "completion": " " + " ".join(words),
                "task": TASK,
                "kind": kind,
                "answer": " ".join(answer),
                "noisy_positions": noisy_positions,
                "has_boilerplate": has_boilerplate,
            }
        )
    return rows


def _make_example(kind: str, rng: random.Random, options: Options) -> tuple[str, list[str]]:
    """A prompt and its clean answer words for one `kind`."""
    if kind in ("sort", "reverse"):
        items = rng.sample(WORDS, rng.randint(options.min_items, options.max_items))
        answer = sorted(items) if kind == "sort" else items[::-1]
        return f"{kind} the words : {' '.join(items)}", answer
    if kind == "add":
        a, b = rng.randint(0, options.max_operand), rng.randint(0, options.max_operand)
        return f"add {a} and {b}", [str(a + b)]
    keys = rng.sample(sorted(RECORD), 3)
    record = {key: rng.choice(RECORD[key]) for key in keys}
    asked = rng.choice(keys)
    fields = " ".join(f"{key}={value}" for key, value in record.items())
    return f"record : {fields} ; copy {asked}", [record[asked]]
