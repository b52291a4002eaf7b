"""Batched prompt/completion tokenization gives exactly the columns TRL's SFTTrainer builds row by row."""

import json

import datasets
import pytest
from trl import SFTConfig, SFTTrainer

from tokensieve.data.loading import DataArguments, load_splits
from tokensieve.data.tokenize import tokenize_prompt_completion
from tokensieve.errors import RecipeError
from tokensieve.launch.recipe import load_recipe


@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_batched_tokenization_matches_trl(tiny_tokenizer, tiny_llama, tmp_path, completion_only_loss):
    rows = [
        {"prompt": "what is k3 ?", "completion": " v7"},
        {"prompt": "sort: b a c", "completion": " a b c"},
        {"prompt": "copy", "completion": " x y z" + tiny_tokenizer.eos_token},  # already ends with EOS
        {"prompt": "ends with a space ", "completion": "tail"},  # tokens may merge across the boundary
    ]
    dataset = datasets.Dataset.from_list(rows)
    tokenized = tokenize_prompt_completion(dataset, tiny_tokenizer, completion_only_loss is not False)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=None,
                     activation_checkpointing=False,
                     completion_only_loss=completion_only_loss)

    def prepared(train_dataset):
        trainer = SFTTrainer(model=tiny_llama, args=args, train_dataset=train_dataset, processing_class=tiny_tokenizer)
        return trainer.train_dataset

    # TRL builds labels from completion_mask itself; ours come ready-made and must be the same.
    ours, theirs = prepared(tokenized), prepared(dataset)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]
    assert all(ids[-1] == tiny_tokenizer.eos_token_id for ids in tokenized["input_ids"])
    assert any(-100 in labels for labels in ours["labels"]) == (completion_only_loss is not False)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_curriculum_comes_first_in_file_order(tmp_path):
    warm = _write(tmp_path / "warm.jsonl", [{"prompt": f"w{i}", "completion": " x"} for i in range(5)])
    main = _write(tmp_path / "main.jsonl", [{"prompt": f"m{i}", "completion": " y"} for i in range(20)])
    splits = load_splits(DataArguments(datasets=[{"path": main}], curriculum=[{"path": warm}], shuffle_seed=1))
    prompts = splits["train"]["prompt"]
    assert prompts[:5] == [f"w{i}" for i in range(5)]
    assert sorted(prompts[5:]) == sorted(f"m{i}" for i in range(20)) and prompts[5:] != [f"m{i}" for i in range(20)]


def test_curriculum_needs_sequential_sampling(repo_root, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "method: sft\nmodel: {name_or_path: x}\n"
        "data: {datasets: [{path: a.jsonl}], curriculum: [{path: b.jsonl}]}\n"
        f"training: {{output_dir: {tmp_path}, use_cpu: true, bf16: false}}\n",
        encoding="utf-8",
    )
    with pytest.raises(RecipeError, match="train_sampling_strategy: sequential"):
        load_recipe(recipe)
    load_recipe(recipe, ["--train_sampling_strategy", "sequential"])
