"""tokensieve.data.synthetic: the task registry, make_task, and the noisy-sft and conditioned generators."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokensieve.data.synthetic import TASKS, build_options, make_task, split_seed
from tokensieve.data.synthetic import conditioned, noisy_sft
from tokensieve.errors import TokensieveError

GENERATORS = {"noisy-sft": noisy_sft, "conditioned": conditioned}


def rows(task, split="train", n=400, seed=0, **options):
    return GENERATORS[task].generate(split, n, seed, build_options(task, options))


# ---- shared contract of generator modules ---------------------------------------------------------------------


def test_registry_names_all_tasks():
    assert set(TASKS) == {"noisy-sft", "noisy-recall", "mapped-recall", "mqar", "needle-qa", "conditioned", "induction",
                          "passkey", "named-keys", "facts", "lm-text", "mapped-passkey"}
    assert TASKS["noisy-sft"] is noisy_sft and TASKS["conditioned"] is conditioned


@pytest.mark.parametrize("task", list(GENERATORS))
def test_rows_follow_the_generator_contract(task):
    module = GENERATORS[task]
    assert module.SPLITS == {"train": 20000, "test": 500}
    for row in rows(task) + rows(task, "test"):
        assert row["task"] == task
        assert isinstance(row["prompt"], str) and not row["prompt"].endswith(" ")
        assert row["completion"].startswith(" ") and row["completion"].strip()
        assert len(row["prompt"].split()) < 40


@pytest.mark.parametrize("task", list(GENERATORS))
def test_deterministic_by_seed_and_split(task):
    assert rows(task, seed=3) == rows(task, seed=3)
    assert rows(task, seed=3) != rows(task, seed=4)
    assert split_seed(0, "train") != split_seed(0, "test")
    assert rows(task, "train", seed=split_seed(0, "train")) != rows(task, "test", seed=split_seed(0, "test"))


@pytest.mark.parametrize("task", list(GENERATORS))
def test_vocabulary_is_small(task):
    words = set()
    for row in rows(task, n=3000):
        words.update(row["prompt"].split() + row["completion"].split())
    # Whole words (field=value pairs count as one word here) stay few enough for a 1-2k BPE vocabulary.
    assert len(words) < 600


# ---- noisy-sft ------------------------------------------------------------------------------------------------


def test_noisy_sft_answers_are_correct():
    kinds = set()
    for row in rows("noisy-sft", "test"):
        kinds.add(row["kind"])
        prompt, answer = row["prompt"], row["answer"].split()
        if row["kind"] == "sort":
            items = prompt.split(" : ", 1)[1].split()
            assert answer == sorted(items)
        elif row["kind"] == "reverse":
            assert answer == prompt.split(" : ", 1)[1].split()[::-1]
        elif row["kind"] == "add":
            _, a, _, b = prompt.split()
            assert answer == [str(int(a) + int(b))]
        else:
            fields = dict(pair.split("=") for pair in prompt.split(" ; ")[0].split()[2:])
            assert answer == [fields[prompt.split()[-1]]]
    assert kinds == set(noisy_sft.KINDS)


def test_noisy_sft_test_split_is_clean():
    for row in rows("noisy-sft", "test", noise_fraction=0.9, boilerplate_fraction=0.9):
        assert row["completion"] == " " + row["answer"]
        assert row["noisy_positions"] == [] and row["has_boilerplate"] is False


def test_noisy_sft_train_noise_and_boilerplate_match_ground_truth():
    train = rows("noisy-sft", n=2000)
    noisy_words = answer_words = 0
    for row in train:
        words = row["completion"].split()
        answer = row["answer"].split()
        prefix = len(noisy_sft.BOILERPLATE_PREFIX) if row["has_boilerplate"] else 0
        if row["has_boilerplate"]:
            assert words[:prefix] == noisy_sft.BOILERPLATE_PREFIX
            assert words[-len(noisy_sft.BOILERPLATE_SUFFIX):] == noisy_sft.BOILERPLATE_SUFFIX
            words = words[: len(words) - len(noisy_sft.BOILERPLATE_SUFFIX)]
        assert len(words) == prefix + len(answer)
        for index, word in enumerate(answer):
            position = prefix + index
            if position in row["noisy_positions"]:
                assert words[position] != word and words[position] in noisy_sft.NOISE_WORDS
            else:
                assert words[position] == word
        noisy_words += len(row["noisy_positions"])
        answer_words += len(answer)
    assert 0.25 < noisy_words / answer_words < 0.35
    assert 0.25 < sum(row["has_boilerplate"] for row in train) / len(train) < 0.35


def test_noisy_sft_options_change_the_rates():
    clean = rows("noisy-sft", n=300, noise_fraction="0", boilerplate_fraction="0.0")
    assert all(r["completion"] == " " + r["answer"] for r in clean)
    with pytest.raises(TokensieveError, match="noise_fraction must be in"):
        build_options("noisy-sft", {"noise_fraction": 1.5})


# ---- conditioned ----------------------------------------------------------------------------------------------


def test_conditioned_ground_truth():
    for row in rows("conditioned", n=1000):
        context = dict(pair.split("=") for pair in row["context"].split())
        assert row["prompt"] == f"context : {row['context']} ; {row['prompt_without_context']}"
        assert "=" not in row["prompt_without_context"]
        words = row["completion"].split()
        assert row["dependent_positions"]
        for position in row["dependent_positions"]:
            field = words[position - 2]  # "the <field> is <value>"
            assert context[field] == words[position]
        # Every other word is predictable from the question alone.
        generic = [w for i, w in enumerate(words) if i not in row["dependent_positions"]]
        assert set(generic) <= {"the", "is", "and", "."} | set(row["prompt_without_context"].split())


# ---- make_task ------------------------------------------------------------------------------------------------


def test_make_task_writes_splits_and_meta(tmp_path):
    out = tmp_path / "ns"
    paths = make_task("noisy-sft", out, n=50, seed=7, noise_fraction="0.5")
    assert set(paths) == {"train", "test", "meta"}
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.jsonl", "train.jsonl"]  # no .tmp left
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert (len(train), len(test)) == (50, 50)  # test keeps its default 500 unless n is smaller
    assert train != test
    meta = json.loads(paths["meta"].read_text())
    assert meta["task"] == "noisy-sft" and meta["seed"] == 7 and meta["n"] == 50
    assert meta["options"]["noise_fraction"] == 0.5
    assert meta["counts"] == {"train": 50, "test": 50}
    again = make_task("noisy-sft", tmp_path / "again", n=50, seed=7, noise_fraction=0.5)
    assert again["train"].read_text() == paths["train"].read_text()


def test_make_task_output_loads_and_validates(tmp_path):
    from tokensieve.data import DataArguments, load_splits

    make_task("conditioned", tmp_path, n=30)
    splits = load_splits(
        DataArguments(datasets=[{"path": str(tmp_path)}], eval_datasets=[{"path": str(tmp_path), "split": "test"}])
    )
    assert (len(splits["train"]), len(splits["test"])) == (30, 30)
    assert "dependent_positions" in splits["train"].column_names


def test_make_task_errors(tmp_path):
    with pytest.raises(TokensieveError, match=r"unknown task 'nope'; valid tasks: \['conditioned', 'facts', 'induction'"):
        make_task("nope", tmp_path)
    with pytest.raises(TokensieveError, match=r"unknown option\(s\) \['noise'\]; valid options: .*'noise_fraction'"):
        make_task("noisy-sft", tmp_path, noise="0.1")
    with pytest.raises(TokensieveError, match="option 'max_items' expects int, got 'many'"):
        make_task("noisy-sft", tmp_path, max_items="many")
    with pytest.raises(TokensieveError, match="n must be >= 1"):
        make_task("conditioned", tmp_path, n=0)
    assert list(tmp_path.iterdir()) == []


# ---- shipped task files ---------------------------------------------------------------------------------------

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "data" / "tasks").glob("*/meta.json"))


@pytest.mark.parametrize("meta_path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_files_match_their_generator(tmp_path, meta_path):
    """The shipped copy is what `make_task` writes today from the recorded task, n, seed and options."""
    meta = json.loads(meta_path.read_text())
    folder = meta_path.parent
    tokenizer = meta["options"].get("tokenizer")  # real-prose tasks are measured in a prepared model's tokens
    if tokenizer and not (Path(__file__).resolve().parents[1] / tokenizer).is_dir():
        pytest.skip(f"{folder.name} is made with the tokenizer in {tokenizer} (tokensieve model prepare smollm2)")
    # Small enough to ship in git: 2.5 MiB per task (mqar-256's 1000 training rows of 256 words take 2.2 MiB).
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 2.5 * 1024 * 1024
    options = dict(meta["options"], **({"tokenizer": str(Path(__file__).resolve().parents[1] / tokenizer)}
                                       if tokenizer else {}))
    fresh = make_task(meta["task"], tmp_path, n=meta["n"], seed=meta["seed"], splits=meta.get("splits"), **options)
    for split in meta["counts"]:
        assert (folder / f"{split}.jsonl").read_bytes() == fresh[split].read_bytes(), split


def test_synthetic_import_does_not_load_datasets():
    code = "import sys, tokensieve.data.synthetic; assert 'datasets' not in sys.modules and 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
