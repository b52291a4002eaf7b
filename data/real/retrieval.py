"""Retrieval in real prose: statements (a pass key, named codes, facts about people) placed at random depths in
paragraphs of one corpus split, then a cue whose answer is copied from one statement.

Every row has `prompt` (prose with the statements, then the cue) and `completion` (" " + answer), plus its ground
truth: `answer`, `metric` ("exact": the first generated tokens are the answer's; "contains": the answer appears in
what is generated), the asked statement's character and token span (`needle_char_span`, `needle_token_span`), the
answer's spans inside it (`answer_char_spans`, `answer_token_spans`: every place the answer is written), every other
statement (`distractors`), `prompt_tokens`, `depth` (0 = start of the prompt) and the phrasing ids. Spans are
[start, end) in characters of `prompt`, and in tokens of `prompt` under the task's tokenizer.

Phrasings: training and validation rows use the training phrasings of the statement and of the cue; test rows use
others, held out (option `phrasings` overrides).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from tokensieve.data.real.corpus import load_corpus
from tokensieve.errors import DataError

SPLITS = {"train": 1000, "validation": 100, "test": 100}
PHRASINGS = ("auto", "train", "held_out")


@dataclass
class RealTextOptions:
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder (e.g. the prepared model "
                                                                    "folder): measures lengths and token spans."})
    prompt_tokens: int = field(default=1024, metadata={"help": "Prompt length in tokens (filler is cut to fit)."})
    corpus: str | None = field(default=None, metadata={"help": "Corpus file (default: the shipped data/text one)."})
    phrasings: str = field(default="auto", metadata={"help": "auto (held-out phrasings in test, training ones "
                                                               "elsewhere), train or held_out."})

    def __post_init__(self):
        if self.tokenizer is None:
            raise ValueError("needs --tokenizer DIR (a tokenizer folder, e.g. models/SmolLM2-135M-Instruct): "
                             "prompt lengths and token spans are measured in its tokens")
        if not 128 <= self.prompt_tokens <= 16384:
            raise ValueError(f"prompt_tokens must be in [128, 16384], got {self.prompt_tokens}")
        if self.phrasings not in PHRASINGS:
            raise ValueError(f"phrasings must be one of {PHRASINGS}, got {self.phrasings!r}")


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise DataError(f"--tokenizer {path}: cannot load a tokenizer there ({error})") from None
    tokenizer.model_max_length = 1 << 30  # only counting here; long prompts are the point
    return tokenizer


@functools.lru_cache(maxsize=8)
def _paragraphs(corpus: str | None, split: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(document id, its paragraphs) of every document of `split`."""
    return tuple((d["id"], tuple(d["text"].split("\n\n"))) for d in load_corpus(corpus, split))


def use_held_out(split: str, options: RealTextOptions) -> bool:
    return options.phrasings == "held_out" or (options.phrasings == "auto" and split == "test")


def filler(rng: random.Random, split: str, options: RealTextOptions, tokens: int,
           avoid: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Consecutive paragraphs of `split` (from a random document and paragraph, on into other documents) of about
    `tokens` tokens, the last one cut at a word; also the ids of the documents used. Paragraphs containing any
    string of `avoid` are skipped (an answer must not appear by chance)."""
    tokenizer = load_tokenizer(options.tokenizer)
    documents = list(_paragraphs(options.corpus, split))
    order = list(range(len(documents)))
    rng.shuffle(order)
    start = rng.randrange(len(documents[order[0]][1]))
    # Each paragraph at most once: the first document from `start`, the others whole, then the first one's beginning.
    stream = [(documents[order[0]][0], p) for p in documents[order[0]][1][start:]]
    stream += [(documents[i][0], p) for i in order[1:] for p in documents[i][1]]
    stream += [(documents[order[0]][0], p) for p in documents[order[0]][1][:start]]
    chosen, used, count = [], [], 0
    for doc_id, paragraph in stream:
        if any(a in paragraph for a in avoid):
            continue
        length = len(tokenizer(paragraph, add_special_tokens=False)["input_ids"]) + 1
        if count + length > tokens:
            words = paragraph.split(" ")
            keep = max(1, int(len(words) * (tokens - count) / length))
            if tokens - count > 8:
                chosen.append(" ".join(words[:keep]).rstrip(",;:") + ".")
                used.append(doc_id)
            return chosen, sorted(set(used))
        chosen.append(paragraph)
        used.append(doc_id)
        count += length
    raise DataError(f"corpus split {split!r} holds fewer than {tokens} tokens of prose")


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """[first, last + 1) of the tokens whose characters overlap [start, end)."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return [inside[0], inside[-1] + 1]


def assemble(rng: random.Random, split: str, options: RealTextOptions, statements: list[str], asked: int, cue: str,
             answer: str, avoid: tuple[str, ...] = ()) -> dict:
    """A row: filler with each statement placed as its own paragraph at a random depth, then `cue`; the spans of
    statement `asked` and of every occurrence of `answer` in it."""
    tokenizer = load_tokenizer(options.tokenizer)
    fixed = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in statements + [cue])
    budget = options.prompt_tokens - fixed
    if budget < 32:
        raise DataError(f"prompt_tokens {options.prompt_tokens} leaves no room for filler around {fixed} tokens")
    paragraphs, documents = filler(rng, split, options, budget, avoid)
    # Never before the first paragraph: the first tokens are what attention sinks keep anyway.
    slots = sorted(rng.randrange(1, len(paragraphs) + 1) for _ in statements)
    order = list(range(len(statements)))
    rng.shuffle(order)
    placed = list(paragraphs)
    for offset, (slot, index) in enumerate(zip(slots, order)):
        placed.insert(slot + offset, (index, statements[index]))
    parts, spans, cursor = [], {}, 0
    for item in placed:
        text = item[1] if isinstance(item, tuple) else item
        if isinstance(item, tuple):
            spans[item[0]] = (cursor, cursor + len(text))
        parts.append(text)
        cursor += len(text) + 2
    prompt = "\n\n".join(parts) + "\n\n" + cue
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    start, end = spans[asked]
    answer_spans = [[start + m.start(), start + m.end()] for m in re.finditer(re.escape(answer), statements[asked])]
    if not answer_spans:
        raise AssertionError(f"answer {answer!r} not written in its statement {statements[asked]!r}")
    distractors = [{"statement": statements[i], "char_span": list(spans[i]),
                    "token_span": token_span(offsets, *spans[i])} for i in range(len(statements)) if i != asked]
    return {
        "prompt": prompt,
        "completion": " " + answer,
        "answer": answer,
        "needle_char_span": [start, end],
        "needle_token_span": token_span(offsets, start, end),
        "answer_char_spans": answer_spans,
        "answer_token_spans": [token_span(offsets, a, b) for a, b in answer_spans],
        "distractors": distractors,
        "prompt_tokens": len(encoded["input_ids"]),
        "depth": round(start / len(prompt), 4),
        "documents": documents,
    }


def pick(rng: random.Random, phrasings: dict[str, list[str]], held_out: bool) -> tuple[int, str]:
    """(id, text) of a phrasing: ids count the training phrasings first, then the held-out ones."""
    pool = "held_out" if held_out else "train"
    index = rng.randrange(len(phrasings[pool]))
    return index + (len(phrasings["train"]) if held_out else 0), phrasings[pool][index]


def number(rng: random.Random, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10000, 100000))
        if value not in taken:
            taken.add(value)
            return value
