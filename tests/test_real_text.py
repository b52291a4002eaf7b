"""The real-prose corpus (shipped, built from Debian packages' texts) and the tasks made on it: ground truth in every
row, splits by document, held-out phrasings in test; and the evaluation they need (answer contained, perplexity)."""

import json

import pytest
import torch

from tokensieve.data.real import corpus as corpus_module
from tokensieve.data.real.corpus import SHIPPED_CORPUS, Source, assign_splits, build_corpus, load_corpus, read_rst
from tokensieve.data.real import facts, named_keys, passkey
from tokensieve.data.synthetic import make_task
from tokensieve.errors import DataError, TokensieveError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


def make(task, tokenizer_dir, tmp_path, split="test", n=6, **options):
    written = make_task(task, tmp_path / task, n=n, splits=[split], tokenizer=tokenizer_dir, prompt_tokens=640,
                        **options)
    return [json.loads(line) for line in written[split].read_text().splitlines()]


# ---- corpus ------------------------------------------------------------------------------------------------------

def test_rst_reduces_to_prose_paragraphs():
    text = """.. _intro:

=====
Title
=====

The :func:`len` function returns the length of an object; see :ref:`the tutorial <tut>` and ``sys.getsizeof``.

.. code-block:: python

    print("not prose")

>>> 1 + 1
2

* a bullet that is dropped because lists are not running prose at all here

Short line.
"""
    assert read_rst(text) == ["The len function returns the length of an object; see the tutorial and sys.getsizeof."]


def test_build_corpus_splits_by_document_and_records_sources(tmp_path):
    folder = tmp_path / "root" / "texts"
    folder.mkdir(parents=True)
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(f"Document number {i} says something long enough to be kept as prose "
                                                "by the reader of plain text.\n\nA second paragraph of this document "
                                                "with enough words to count as a sentence.\n", encoding="utf-8")
    source = Source("toy", "toy-package", "CC0-1.0", "texts", ("*.txt",), corpus_module.read_plain)
    meta = build_corpus(tmp_path / "out", tmp_path / "root", sources=(source,))
    documents = load_corpus(tmp_path / "out")
    assert len(documents) == 20 and {d["licence"] for d in documents} == {"CC0-1.0"}
    assert meta["sources"] == [{"name": "toy", "package": "toy-package", "licence": "CC0-1.0", "version": "unpacked",
                                "documents": 20}]
    assert sum(c["documents"] for c in meta["splits"].values()) == 20 and set(meta["splits"]) == {
        "train", "validation", "test"}
    with pytest.raises(DataError, match="source 'toy': no files under .*apt-get install toy-package"):
        build_corpus(tmp_path / "out2", tmp_path / "elsewhere", sources=(source,))


def test_assign_splits_fills_shares_with_whole_documents():
    documents = [{"id": f"d{i}", "text": "x" * (100 + i)} for i in range(100)]
    split = {d["id"]: d["split"] for d in assign_splits(documents)}
    chars = {s: sum(100 + int(i[1:]) for i, v in split.items() if v == s) for s in ("train", "validation", "test")}
    total = sum(chars.values())
    assert 0.12 <= chars["test"] / total < 0.14 and 0.08 <= chars["validation"] / total < 0.10


def test_shipped_corpus_is_split_by_document_with_licences():
    documents = load_corpus()
    meta = json.loads((SHIPPED_CORPUS.parent / "meta.json").read_text())
    assert {s["name"] for s in meta["sources"]} == {d["source"] for d in documents}
    assert all(s["licence"] and s["package"] for s in meta["sources"])
    assert len({d["id"] for d in documents}) == len(documents)
    by_split = {s: {d["id"] for d in documents if d["split"] == s} for s in ("train", "validation", "test")}
    assert all(by_split.values()) and not (by_split["train"] & by_split["test"])
    # No paragraph of a test document appears in a training or validation one (licence versions and release notes
    # share paragraphs: they split by family, and repeats stay in train only).
    paragraphs = {s: {p for d in documents if d["split"] == s for p in d["text"].split("\n\n")} for s in by_split}
    assert not paragraphs["test"] & (paragraphs["train"] | paragraphs["validation"])
    assert not paragraphs["validation"] & paragraphs["train"]


# ---- tasks -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["passkey", "named-keys", "facts"])
def test_rows_carry_their_ground_truth(task, tokenizer_dir, tmp_path, tiny_tokenizer):
    test_documents = {d["id"] for d in load_corpus(split="test")}
    for row in make(task, tokenizer_dir, tmp_path):
        prompt, answer = row["prompt"], row["answer"]
        assert row["completion"] == " " + answer and row["metric"] in ("exact", "contains")
        start, end = row["needle_char_span"]
        for a, b in row["answer_char_spans"]:
            assert start <= a < b <= end and prompt[a:b] == answer
        ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(ids) == row["prompt_tokens"] and abs(row["prompt_tokens"] - 640) <= 0.1 * 640
        for first, last in row["answer_token_spans"]:
            assert answer in tiny_tokenizer.decode(ids[first:last])
        assert 0 < row["depth"] < 1 and set(row["documents"]) <= test_documents
        assert not row["prompt"].endswith(" ")
        for other in row["distractors"]:
            a, b = other["char_span"]
            assert prompt[a:b] == other["statement"] and answer not in other["statement"]


def test_named_keys_and_facts_ask_one_of_several(tokenizer_dir, tmp_path):
    for row in make("named-keys", tokenizer_dir, tmp_path, num_keys=5):
        assert len(row["distractors"]) == 4 and row["prompt"].count(row["answer"]) == 1
        assert row["prompt"].endswith(f"The code for the {row['asked_name']} is")
    for row in make("facts", tokenizer_dir, tmp_path, num_facts=2):
        assert len(row["distractors"]) == 1 and row["metric"] == "contains" and row["person"] in row["prompt"]


@pytest.mark.parametrize("module, task", [(passkey, "passkey"), (named_keys, "named-keys")])
def test_test_rows_use_held_out_phrasings(module, task, tokenizer_dir, tmp_path):
    def cues(split):
        return {row["prompt"].rsplit("\n\n", 1)[1] for row in make(task, tokenizer_dir, tmp_path / split, split, 12)}

    held_out = {c.split("{n}")[0] for c in module.CUES["held_out"]}
    train = {c.split("{n}")[0] for c in module.CUES["train"]}
    assert all(any(c.startswith(h) for h in held_out) for c in cues("test"))
    assert all(any(c.startswith(t) for t in train) for c in cues("train"))


def test_mapped_passkey_asks_for_the_shifted_key_with_noise_and_boilerplate(tokenizer_dir, tmp_path):
    from tokensieve.data.real.mapped_passkey import CUES, shift

    assert shift("58213", 1) == "69324" and shift("09990", 1) == "10001" and shift("58213", -1) == "47102"
    rows = make("mapped-passkey", tokenizer_dir, tmp_path, "train", 60, unlearnable_share=0.3, learnable_share=0.3)
    kinds = []
    for row in rows:
        key, prompt = row["key"], row["prompt"]
        assert row["answer"] == shift(key, 1) and key in prompt[slice(*row["needle_char_span"])]
        assert row["answer"] not in prompt  # the shifted key is never written in the prose by chance
        assert any(prompt.endswith(cue) for cue in CUES["train"])
        (answer, tail), completion = row["noise_spans"], row["completion"]
        word = completion[answer["start"]:answer["end"]]
        assert word == {"clean": shift(key, 1), "learnable": shift(key, -1)}.get(answer["kind"], word)
        assert len(word) == 5 and word.isdigit() and (answer["kind"] != "unlearnable" or word != row["answer"])
        assert tail["kind"] == "boilerplate" and completion[tail["start"]:tail["end"]] == f"The pass key is {key}."
        kinds.append(answer["kind"])
    assert {"clean", "unlearnable", "learnable"} == set(kinds)
    for row in make("mapped-passkey", tokenizer_dir, tmp_path / "test", "test", 6):
        assert row["completion"] == " " + shift(row["key"], 1) and len(row["noise_spans"]) == 1
        assert any(row["prompt"].endswith(cue) for cue in CUES["held_out"])


def test_facts_held_out_statements_are_not_in_training(tokenizer_dir, tmp_path):
    held_out = [s.split("{p}")[0] for _, statements, _ in facts.RELATIONS.values() for s in statements["held_out"]]
    for row in make("facts", tokenizer_dir, tmp_path, "train", 12):
        for statement in [row["prompt"][slice(*row["needle_char_span"])]] + [d["statement"] for d in row["distractors"]]:
            assert not any(h and statement.startswith(h) for h in held_out), statement


def test_lm_text_rows_and_determinism(tokenizer_dir, tmp_path):
    rows = make("lm-text", tokenizer_dir, tmp_path)
    assert all(abs(r["tokens"] - 640) <= 64 and r["text"].strip() for r in rows)
    assert rows == make("lm-text", tokenizer_dir, tmp_path / "again")
    assert "prompt" not in rows[0]


def test_lm_text_rows_split_into_prompt_and_completion_at_a_token(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = make("lm-text", tokenizer_dir, tmp_path, completion_tokens=100)
    assert [r["text"] for r in rows] == [r["text"] for r in make("lm-text", tokenizer_dir, tmp_path / "plain")]
    for row in rows:
        assert row["prompt"] + row["completion"] == row["text"]
        whole = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        assert tokenizer(row["completion"], add_special_tokens=False)["input_ids"] == whole[-100:]
    with pytest.raises(TokensieveError, match="completion_tokens must be in"):
        make("lm-text", tokenizer_dir, tmp_path / "bad", completion_tokens=640)


def test_real_tasks_need_a_tokenizer(tmp_path):
    with pytest.raises(TokensieveError, match="needs --tokenizer DIR"):
        make_task("passkey", tmp_path)
    with pytest.raises(TokensieveError, match="unknown split"):
        make_task("passkey", tmp_path, splits=["dev"], tokenizer="x")


# ---- evaluation: answer contained, perplexity through a bounded cache ------------------------------------------------

def test_contains_metric_and_perplexity(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    from tokensieve.launch.cli import main
    from tokensieve.launch.evaluate import exact_match, perplexity
    from tokensieve.selectors.kv_cache import RetentionCache

    prompts = ["record 3 : key", "hello"]
    _, generated = exact_match(tiny_llama, tiny_tokenizer, prompts, ["?", "?"], max_new_tokens=6)
    inner = [g.strip().split(" ")[-1] or g for g in generated]  # a piece from inside the generation
    score, _ = exact_match(tiny_llama, tiny_tokenizer, prompts, inner, metrics=["contains", "contains"])
    assert score == 1.0
    assert exact_match(tiny_llama, tiny_tokenizer, prompts, ["zzzz", "zzzz"], metrics=["contains"] * 2)[0] == 0.0

    texts = ["record 1 : key k1 maps to value v7 ; copy the value", "hello world hello world sort the words"]
    full, count = perplexity(tiny_llama, tiny_tokenizer, texts)
    roomy, _ = perplexity(tiny_llama, tiny_tokenizer, texts,
                          make_cache=lambda: RetentionCache.for_model(tiny_llama, 1000, 4, "streaming"))
    tight, _ = perplexity(tiny_llama, tiny_tokenizer, texts,
                          make_cache=lambda: RetentionCache.for_model(tiny_llama, 2, 2, "streaming"))
    assert count == sum(len(tiny_tokenizer(t)["input_ids"]) - 1 for t in texts)
    assert roomy == pytest.approx(full, rel=1e-4) and tight != pytest.approx(full, rel=1e-3)
    with torch.no_grad():  # perplexity of one text is exp(mean loss) of the model's own forward
        ids = tiny_tokenizer(texts[0], return_tensors="pt")["input_ids"]
        loss = tiny_llama(input_ids=ids, labels=ids).loss
    assert perplexity(tiny_llama, tiny_tokenizer, texts[:1])[0] == pytest.approx(loss.exp().item(), rel=1e-4)

    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert main(["eval", str(model_dir), "--data", str(data), "--output", str(out), "--memory-ratio", "0.5",
                 "--policy", "streaming"]) == 0
    result = json.loads(out.read_text())["results"][str(data)]
    assert result["memory_ratio"] == 0.5 and result["memory_size"] >= 1 and result["perplexity"] > 1
    assert main(["eval", str(model_dir), "--data", str(data), "--memory-ratio", "1.5", "--policy", "h2o"]) == 2
    assert "--memory-ratio must be in (0, 1]" in capsys.readouterr().err


def test_real_rows_label_their_tokens_for_retention_maps(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from tokensieve.trainers.retention_map import REAL_KINDS, recall_token_kinds

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for row in make("named-keys", tokenizer_dir, tmp_path, n=3):
        ids, kinds, names, asked = recall_token_kinds(row, tokenizer)
        assert names == list(REAL_KINDS) and len(kinds) == len(ids) and set(kinds) <= set(names)
        assert tokenizer.decode(ids[asked]).strip() == row["answer"]
        cue = row["prompt"][row["prompt"].rfind("\n\n") + 2:]
        assert tokenizer.decode(ids[[i for i, k in enumerate(kinds) if k == "cue"]]).strip() == cue.strip()
        distractors = tokenizer.decode(ids[[i for i, k in enumerate(kinds) if k == "distractor"]])
        assert len(row["distractors"]) == 3 and all(d["statement"][-6:] in distractors for d in row["distractors"])
        assert kinds.count("first") <= 4 and "prose" in kinds and "punctuation" in kinds
