"""Token-level curation: scores match a direct computation, columns line up with training, the CLI writes the
dataset and the report atomically, bad data is named."""

import json

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM

from tokensieve.data.curation import CurateConfig, curate, token_masks
from tokensieve.launch.cli import main
from tokensieve.launch.model import FromScratchArguments, build_config
from tokensieve.trainers.token_loss import TokenLossConfig, TokenLossTrainer
from trl.trainer.utils import add_fused_lm_head


def model_dir(tmp_path_factory, tokenizer, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        build_config(FromScratchArguments(architecture="qwen3", max_position_embeddings=128), tokenizer))
    folder = tmp_path_factory.mktemp(f"model{seed}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    return model_dir(tmp_path_factory, tiny_tokenizer, 0), model_dir(tmp_path_factory, tiny_tokenizer, 1)


@pytest.fixture(scope="module")
def data_file(repo_root, tmp_path_factory):
    rows = [json.loads(line) for line in (repo_root / "data/tasks/conditioned/train.jsonl").open()][:12]
    path = tmp_path_factory.mktemp("cur") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    add_fused_lm_head(model)
    return model.eval()


def rows_of(path):
    return [json.loads(line) for line in open(path)]


def test_reference_loss_scores_equal_a_direct_computation(models, data_file, tiny_tokenizer, tmp_path):
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    config = CurateConfig(output=str(tmp_path / "out.jsonl"), scorer="reference_loss", batch_size=5, keep_ratio=0.5)
    summary = curate(dataset, load(models[0]), tiny_tokenizer, config)
    written = rows_of(tmp_path / "out.jsonl")
    assert len(written) == summary["examples_written"] == 12
    plain = AutoModelForCausalLM.from_pretrained(models[0]).eval()
    for row in written[:3]:
        prompt_ids = tiny_tokenizer(row["prompt"])["input_ids"]
        ids = tiny_tokenizer(row["prompt"] + row["completion"] + tiny_tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            logprobs = plain(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        expected = [-logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))]
        assert row["token_scores"] == pytest.approx(expected, abs=1e-4)
        assert row["num_response_tokens"] == len(expected)
        assert sum(row["token_mask"]) == row["kept_tokens"] == -(-len(expected) // 2)  # ceil(0.5 n)
    report = tmp_path / "out.jsonl.report"
    assert (report / "score_histogram.png").stat().st_size > 0
    assert '<span class="tok' in (report / "report.html").read_text()
    assert json.loads((report / "summary.json").read_text())["response_tokens"] == summary["response_tokens"]


def test_excess_prior_attention_and_sstoken_scorers(models, data_file, tiny_tokenizer, tmp_path):
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    model, reference = load(models[0]), load(models[1])
    out = {}
    for scorer in ("reference_loss", "excess_loss", "prior", "attention", "sstoken"):
        config = CurateConfig(output=str(tmp_path / f"{scorer}.jsonl"), scorer=scorer, batch_size=4,
                              reference_model=str(models[1]) if scorer in ("excess_loss", "sstoken") else None)
        curate(dataset, model, tiny_tokenizer, config, reference=reference)
        out[scorer] = rows_of(tmp_path / f"{scorer}.jsonl")
    ref_only = CurateConfig(output=str(tmp_path / "ref.jsonl"), scorer="reference_loss")
    curate(dataset, reference, tiny_tokenizer, ref_only)
    ref = rows_of(tmp_path / "ref.jsonl")
    for row, model_row, ref_row in zip(out["excess_loss"], out["reference_loss"], ref):
        expected = [a - b for a, b in zip(model_row["token_scores"], ref_row["token_scores"])]
        assert row["token_scores"] == pytest.approx(expected, abs=1e-4)
    for row in out["prior"]:
        weights = row["token_weights"]
        assert len(weights) == row["num_response_tokens"]
        assert sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-4)
        assert all(0.0 <= s <= 1.0 for s in row["token_scores"])
    for row in out["attention"] + out["sstoken"]:
        assert all(-1e-6 <= s <= 1.0 + 1e-6 for s in row["token_scores"])


def test_curated_columns_train(models, data_file, tiny_tokenizer, tmp_path):
    """The token_mask a curation writes is a column the trainer accepts, example by example."""
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    curate(dataset, load(models[0]), tiny_tokenizer,
           CurateConfig(output=str(tmp_path / "cur.parquet"), scorer="reference_loss", keep_ratio=0.5))
    curated = load_dataset("parquet", data_files=str(tmp_path / "cur.parquet"), split="train")
    args = TokenLossConfig(output_dir=str(tmp_path / "run"), token_scorer="column", token_weights_column="token_mask",
                           max_steps=1, per_device_train_batch_size=4, report_to="none", use_cpu=True, bf16=False,
                           activation_checkpointing=False, save_strategy="no", logging_steps=1)
    trainer = TokenLossTrainer(model=AutoModelForCausalLM.from_pretrained(models[0]), args=args,
                               train_dataset=curated, processing_class=tiny_tokenizer)
    trainer.train()
    kept = [e["kept_fraction"] for e in trainer.state.log_history if "kept_fraction" in e]
    assert kept and 0.5 <= kept[0] < 0.75


def test_global_mask_keeps_the_top_share_of_the_dataset():
    masks = token_masks([[0.1, 0.9], [0.5, 0.2, 0.8]], keep_ratio=0.4, level="global")  # ceil(0.4 * 5) = 2
    assert masks == [[0, 1], [0, 0, 1]]


def write_recipe(path, model, data, output, **curate_options):
    curate_block = {"output": str(output), "scorer": "reference_loss", "batch_size": 4, **curate_options}
    path.write_text(json.dumps({"model": {"name_or_path": str(model)}, "data": {"datasets": [{"path": str(data)}]},
                                "curate": curate_block}))  # JSON is YAML
    return path


def test_cli_curate_and_keep_examples(models, data_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "curate.yaml", models[0], data_file, tmp_path / "out")
    assert main(["curate", str(recipe), "--keep_examples", "0.5", "--curate.report_examples", "3"]) == 0
    assert "report:" in capsys.readouterr().out
    assert main(["curate", str(recipe), "--output", str(tmp_path / "all.jsonl")]) == 0
    half = rows_of_dataset(Dataset.load_from_disk(str(tmp_path / "out")))
    everything = rows_of(tmp_path / "all.jsonl")
    assert len(half) == 6 and len(everything) == 12
    kept = {row["prompt"] for row in half}
    dropped = [row["score_mean"] for row in everything if row["prompt"] not in kept]
    assert min(row["score_mean"] for row in half) >= max(dropped)  # the top half by score_mean
    assert (tmp_path / "out.report" / "report.html").read_text().count('class="example"') == 3


def rows_of_dataset(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_empty_response_is_named_and_nothing_is_written(models, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n" + json.dumps({"prompt": "c", "completion": ""}) + "\n")
    recipe = write_recipe(tmp_path / "curate.yaml", models[0], data, tmp_path / "out.jsonl")
    assert main(["curate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "example 1" in err and "completion" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_failure_midway_leaves_no_output(models, data_file, tiny_tokenizer, tmp_path, monkeypatch):
    from tokensieve.data import curation

    calls = {"n": 0}
    original = curation.TokenScorer.score

    def failing(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return original(self, rows)

    monkeypatch.setattr(curation.TokenScorer, "score", failing)
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    with pytest.raises(RuntimeError):
        curate(dataset, load(models[0]), tiny_tokenizer,
               CurateConfig(output=str(tmp_path / "out.jsonl"), scorer="reference_loss", batch_size=4))
    assert list(tmp_path.iterdir()) == []


def test_recipe_errors_name_the_key(models, data_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "curate.yaml", models[0], data_file, tmp_path / "o.jsonl", scorer="magic")
    assert main(["curate", str(recipe)]) == 2
    assert "curate: scorer must be one of" in capsys.readouterr().err
    recipe = write_recipe(tmp_path / "curate.yaml", models[0], data_file, tmp_path / "o.jsonl", scorer="excess_loss")
    assert main(["curate", str(recipe)]) == 2
    assert "reference_model is required" in capsys.readouterr().err
