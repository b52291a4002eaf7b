"""tokensieve.data.loading: every input format, mixtures, splits, and one clear error per kind of bad data."""

import json
import os

import datasets
import pytest

from tokensieve.data import DataArguments, detect_format, load_splits
from tokensieve.errors import DataError, RecipeError

PC_ROWS = [{"prompt": f"q{i}", "completion": f" a{i}", "token_weights": [1.0, 0.5]} for i in range(6)]
MESSAGE_ROWS = [
    {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
    for i in range(4)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def load(*paths, **kwargs):
    """load_splits on local sources given as paths or DatasetConfig dicts."""
    entries = [p if isinstance(p, dict) else {"path": p} for p in paths]
    return load_splits(DataArguments(datasets=entries, **kwargs))


def load_error(*paths, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load(*paths, **kwargs)
    return str(info.value)


# ---- formats --------------------------------------------------------------------------------------------------


def test_jsonl_prompt_completion_keeps_extra_columns(tmp_path):
    splits = load(write_jsonl(tmp_path / "d.jsonl", PC_ROWS))
    assert list(splits) == ["train"]
    train = splits["train"]
    assert len(train) == 6
    assert detect_format(train) == "prompt_completion"
    assert "token_weights" in train.column_names
    assert sorted(train["completion"]) == sorted(row["completion"] for row in PC_ROWS)


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "hello world"}, {"text": "bye"}]), encoding="utf-8")
    train = load(str(path))["train"]
    assert detect_format(train) == "text"
    assert sorted(train["text"]) == ["bye", "hello world"]


def test_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(MESSAGE_ROWS).to_parquet(str(path))
    train = load(str(path))["train"]
    assert detect_format(train) == "messages"
    assert len(train) == 4


def test_save_to_disk_folder_and_arrow_file(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(PC_ROWS).save_to_disk(str(folder))
    assert len(load(str(folder))["train"]) == 6
    assert len(load(str(folder), test_split_size=2, max_train_samples=3)["train"]) == 3
    assert [p.name for p in folder.glob("cache-*")] == []  # loading leaves the user's folder untouched
    arrow_file = next(folder.glob("data-*.arrow"))
    assert len(load(str(arrow_file))["train"]) == 6


def test_dataset_dict_folder_picks_split(tmp_path):
    folder = tmp_path / "saved_dict"
    train = datasets.Dataset.from_list(PC_ROWS)
    datasets.DatasetDict({"train": train, "test": train.select(range(2))}).save_to_disk(str(folder))
    splits = load(str(folder), eval_datasets=[{"path": str(folder), "split": "test"}])
    assert (len(splits["train"]), len(splits["test"])) == (6, 2)
    message = load_error({"path": str(folder), "split": "validation"})
    assert "no split 'validation'" in message and "saved_dict" in message


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PC_ROWS)
    write_jsonl(tmp_path / "test.jsonl", PC_ROWS[:3])
    splits = load(str(tmp_path), eval_datasets=[{"path": str(tmp_path), "split": "test"}])
    assert (len(splits["train"]), len(splits["test"])) == (6, 3)


def test_conversational_prompt_completion(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "2+2"}], "completion": [{"role": "assistant", "content": "4"}]}
    ] * 3
    train = load(write_jsonl(tmp_path / "c.jsonl", rows))["train"]
    assert detect_format(train) == "prompt_completion"


def test_builder_name_with_data_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    assert len(load({"path": "json", "data_files": path})["train"]) == 6


# ---- mixtures, splits, limits ---------------------------------------------------------------------------------


def test_mixture_concatenates_and_shuffles_by_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}", "source": "b"} for i in range(10)])
    first = load(a, b, shuffle_seed=1)["train"]
    assert len(first) == 30
    assert first["text"] == load(a, b, shuffle_seed=1)["train"]["text"]
    assert first["text"] != load(a, b, shuffle_seed=2)["train"]["text"]
    assert first["text"] != sorted(first["text"])  # shuffled, not file order
    assert {row["source"] for row in first if row["text"].startswith("a")} == {None}


def test_mixture_fraction_follows_trl_rule(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    texts = load({"path": a, "fraction": 0.5}, {"path": b, "fraction": 0.5})["train"]["text"]
    # Equal shares, capped by the smaller source: 10 + 10 rows, the first ones of each.
    assert sorted(texts) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    message = load_error({"path": a, "fraction": 0.5}, {"path": b})
    assert "`fraction` must be set for all datasets" in message


def test_mixture_of_different_formats_is_an_error(tmp_path):
    a = write_jsonl(tmp_path / "pc.jsonl", PC_ROWS)
    b = write_jsonl(tmp_path / "msgs.jsonl", MESSAGE_ROWS)
    message = load_error(a, b)
    assert "share one format" in message
    assert "pc.jsonl" in message and "prompt_completion" in message
    assert "msgs.jsonl" in message and "messages" in message


def test_test_split_size_and_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(20)])
    splits = load(path, test_split_size=0.25, max_train_samples=5, max_eval_samples=2)
    assert (len(splits["train"]), len(splits["test"])) == (5, 2)
    again = load(path, test_split_size=0.25)
    assert set(again["train"]["text"]).isdisjoint(again["test"]["text"])
    assert len(again["test"]) == 5


def test_nothing_left_after_max_train_samples(tmp_path):
    message = load_error(write_jsonl(tmp_path / "d.jsonl", PC_ROWS), max_train_samples=0)
    assert "split 'train' is empty" in message and "max_train_samples=0" in message


def test_data_arguments_are_strict():
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['pth'\].*allowed keys"):
        DataArguments(datasets=[{"pth": "x.jsonl"}])
    with pytest.raises(RecipeError, match="not both"):
        DataArguments(datasets=[{"path": "a.jsonl"}], eval_datasets=[{"path": "b.jsonl"}], test_split_size=0.1)
    with pytest.raises(RecipeError, match="test_split_size"):
        DataArguments(datasets=[{"path": "a.jsonl"}], test_split_size=1.5)
    with pytest.raises(DataError, match="data.datasets is empty"):
        load_splits(DataArguments())


# ---- unreadable sources ---------------------------------------------------------------------------------------


def test_file_not_found(tmp_path):
    message = load_error(str(tmp_path / "missing.jsonl"))
    assert "missing.jsonl" in message and "not found" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\n")
    message = load_error(str(path))
    assert "d.csv" in message and "unsupported file extension '.csv'" in message and ".jsonl" in message


def test_unparseable_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", completion\n')
    message = load_error(str(path))
    assert "broken.jsonl" in message and "could not be read" in message and "JSON parse error" in message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    lines = '{"prompt": "ok", "completion": " b"}\n{"prompt": "caf\xe9", "completion": " b"}\n'
    path.write_bytes(lines.encode("latin-1"))
    message = load_error(str(path))
    assert "latin.jsonl" in message and "not valid UTF-8 at line 2" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert "empty.jsonl" in (message := load_error(str(path))) and "empty" in message


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="would try the network")
def test_unreachable_hub_name():
    message = load_error("tokensieve-test/does-not-exist")
    assert "'tokensieve-test/does-not-exist' (split 'train')" in message


# ---- bad columns and rows -------------------------------------------------------------------------------------


def test_no_recognisable_format(tmp_path):
    message = load_error(write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}]))
    assert "odd.jsonl" in message and "no recognisable format" in message
    assert "['question', 'answer']" in message and "'messages'" in message and "'text'" in message


def test_prompt_without_completion_column(tmp_path):
    message = load_error(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]))
    assert "p.jsonl" in message and "no 'completion' column" in message


def test_selected_column_missing(tmp_path):
    message = load_error({"path": write_jsonl(tmp_path / "d.jsonl", PC_ROWS), "columns": ["prompt", "answer"]})
    assert "['answer']" in message and "d.jsonl" in message


GOOD = {"prompt": "q", "completion": " a"}
GOOD_MESSAGES = MESSAGE_ROWS[0]
BAD_ROWS = {
    "missing completion": ([GOOD, GOOD, {"prompt": "q"}], 2, "completion", "null (missing)"),
    "empty completion": ([GOOD, {"prompt": "q", "completion": "  \n"}], 1, "completion", "a non-empty string"),
    "number completion": ([GOOD, {"prompt": "q", "completion": 5}], 1, "completion", "int 5"),
    "number prompt": ([{"prompt": 7, "completion": " a"}], 0, "prompt", "expected a string"),
    "empty text": ([{"text": "ok"}, {"text": "ok"}, {"text": ""}], 2, "text", "a non-empty string"),
    "messages not a list": ([GOOD_MESSAGES, {"messages": "hello"}], 1, "messages", "list of {'role', 'content'}"),
    "message without content": (
        [GOOD_MESSAGES, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}],
        1,
        "messages[1].content",
        "expected a string, got null",
    ),
    "no assistant turn": (
        [GOOD_MESSAGES, GOOD_MESSAGES, {"messages": [{"role": "user", "content": "a"}]}],
        2,
        "messages",
        "at least one 'assistant' turn, got roles ['user']",
    ),
    "empty assistant turn": (
        [GOOD_MESSAGES, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}],
        1,
        "messages[1].content",
        "a non-empty assistant turn",
    ),
    "conversational completion is a string": (
        [
            {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]},
            {"prompt": [{"role": "user", "content": "a"}], "completion": "b"},
        ],
        1,
        "completion",
        "list of {'role', 'content'} messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_index_and_field(tmp_path, case):
    rows, index, field, expected = BAD_ROWS[case]
    message = load_error(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert "bad.jsonl" in message
    assert f"example {index}," in message
    assert f"field '{field}'" in message
    assert expected in message


def test_bad_row_in_folder_names_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PC_ROWS)
    write_jsonl(tmp_path / "test.jsonl", [GOOD, {"prompt": "q", "completion": ""}])
    message = load_error(str(tmp_path), eval_datasets=[{"path": str(tmp_path), "split": "test"}])
    assert f"'{tmp_path}' (split 'test'), example 1, field 'completion'" in message
