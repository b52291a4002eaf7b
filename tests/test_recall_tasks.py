"""The recall tasks (mqar, needle-qa, induction): every answer follows from the context, test rows ask once."""

import re

import pytest

from tokensieve.data.synthetic import build_options
from tokensieve.data.synthetic import induction, mqar, needle_qa
from tokensieve.errors import TokensieveError


def _pairs(context: str) -> dict[str, str]:
    """Key -> value of every upper-case key word in an mqar context (a key is always followed by its value)."""
    words = context.split()
    return {w: words[i + 1] for i, w in enumerate(words) if w.isupper()}


@pytest.mark.parametrize("split", ["train", "test"])
def test_mqar_answers_are_the_bound_values(split):
    options = build_options("mqar", {})
    for row in mqar.generate(split, 50, 3, options):
        context, question = row["prompt"].rsplit(" ? ", 1)
        pairs = _pairs(context)
        assert len(pairs) == options.num_pairs
        assert len(context.split()) == options.context_words
        assert pairs[question] == row["answer"] == row["answers"][0]
        # Every later question in the completion is answered by its own key's value.
        for key, value in re.findall(r"\? (\S+) (\S+)", row["completion"]):
            assert pairs[key] == value
        words = context.split()
        assert [words[p] for p in row["pair_positions"]] == [w for w in words if w.isupper()]
        expected_queries = options.train_queries if split == "train" else 1
        assert len(row["queries"]) == expected_queries
        if split == "test":
            assert row["completion"] == f" {row['answer']}"


def test_mqar_vocabularies_are_disjoint_and_letters_only():
    from tokensieve.data.synthetic.words import filler_words

    keys, values, filler = set(mqar.KEYS), set(mqar.VALUES), set(filler_words())
    assert not keys & values and not keys & filler and not values & filler
    # Byte-level BPE splits letters from digits, so only letter words can become single tokens.
    assert all(w.isalpha() for w in keys | values | filler)


@pytest.mark.parametrize("split", ["train", "test"])
def test_needle_answer_is_the_needle_fact(split):
    options = build_options("needle-qa", {})
    for row in needle_qa.generate(split, 50, 5, options):
        context, question = row["prompt"].rsplit(" ? ", 1)
        facts = [f.split() for f in context.split(" .") if f.strip()]
        assert len(facts) == options.num_facts
        relation, name = question.split()
        needle = facts[row["needle_index"]]
        assert needle[:2] == [relation, name] and needle[2] == row["answer"]
        # Names are unique within a context, so exactly one fact answers.
        assert sum(f[1] == name for f in facts) == 1
        assert context.split()[row["needle_position"] + 1] == name
        if split == "test":
            assert row["completion"] == f" {row['answer']}"
        else:
            assert row["completion"].count("?") == options.train_questions - 1


def test_induction_copies_the_segment():
    for row in induction.generate("train", 20, 0, build_options("induction", {"min_words": 3, "max_words": 5})):
        segment = row["prompt"].removesuffix(" ;")
        assert row["completion"] == f" {segment}" and 3 <= len(segment.split()) <= 5


def test_same_seed_same_rows_other_seed_other_rows():
    options = build_options("mqar", {})
    assert mqar.generate("test", 5, 0, options) == mqar.generate("test", 5, 0, options)
    assert mqar.generate("test", 5, 0, options) != mqar.generate("test", 5, 1, options)
    assert mqar.generate("train", 5, 0, options) != mqar.generate("test", 5, 0, options)


@pytest.mark.parametrize(
    "task, options, message",
    [
        ("mqar", {"num_pairs": "0"}, "num_pairs must be in"),
        ("mqar", {"num_pairs": "8", "context_words": "10"}, "context_words"),
        ("needle-qa", {"num_facts": "1000"}, "num_facts must be in"),
        ("induction", {"min_words": "9", "max_words": "3"}, "min_words <= max_words"),
    ],
)
def test_out_of_range_options_name_the_option(task, options, message):
    with pytest.raises(TokensieveError, match=message):
        build_options(task, options)
