"""The `tokensieve` command line: one-line errors with exit status 2, data make/check, an in-process train."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokensieve.launch.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: sft\nmodel: {name_or_path: x}\ndata: {datasets: []}\ntraining: {learnin_rate: 1}\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ") and "training.learnin_rate" in err and "learning_rate" in err
    assert "Traceback" not in err


def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["--debug", "train", str(tmp_path / "missing.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_console_entry_point_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tokensieve", "train", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: recipe not found: {tmp_path / 'missing.yaml'}"


def test_data_make_and_check(tmp_path, capsys):
    pytest.importorskip("tokensieve.data.synthetic")
    out = tmp_path / "noisy"
    assert main(["data", "make", "noisy-sft", "--out", str(out), "--n", "12", "--seed", "1"]) == 0
    assert (out / "train.jsonl").is_file() and (out / "meta.json").is_file()
    assert len((out / "train.jsonl").read_text().splitlines()) == 12
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    capsys.readouterr()
    assert main(["data", "check", str(out / "train.jsonl")]) == 0
    assert "12 examples, format prompt_completion" in capsys.readouterr().out


def test_data_make_unknown_option_is_exit_2(tmp_path, capsys):
    pytest.importorskip("tokensieve.data.synthetic")
    assert main(["data", "make", "noisy-sft", "--out", str(tmp_path), "--bogus_option", "3"]) == 2
    assert "bogus_option" in capsys.readouterr().err


def test_train_tiny_recipe_in_process(tiny_run_overrides, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert main(["train", "recipes/sft/lora_tiny.yaml", *tiny_run_overrides(output_dir, steps=3)]) == 0
    assert "rank 0 of 1" in capsys.readouterr().out
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (output_dir / "recipe.yaml").is_file()
    # The adapter reloads on its saved from-scratch base and gives the same outputs as the merged model.
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    base = AutoModelForCausalLM.from_pretrained(output_dir / "base_model")
    model = PeftModel.from_pretrained(base, output_dir).eval()
    batch = tokenizer("what is k3 ?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    assert logits.shape[-1] == len(tokenizer) and torch.allclose(logits, merged, atol=1e-5)


def test_resume_from_last_checkpoint(tiny_run_overrides, tmp_path, capsys):
    output_dir = tmp_path / "resume"
    first = [*tiny_run_overrides(output_dir, steps=2), "--save_strategy", "steps", "--save_steps", "2"]
    assert main(["train", "recipes/sft/lora_tiny.yaml", *first]) == 0
    assert (output_dir / "checkpoint-2").is_dir()
    second = [*first, "--max_steps", "3", "--resume_from_checkpoint", "true"]
    assert main(["train", "recipes/sft/lora_tiny.yaml", *second]) == 0
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len(state["log_history"]) >= 1
    assert (output_dir / "checkpoint-3").is_dir()


def test_resume_from_missing_folder_is_exit_2(tiny_run_overrides, tmp_path, capsys):
    overrides = [*tiny_run_overrides(tmp_path / "x"), "--resume_from_checkpoint", str(tmp_path / "nope")]
    assert main(["train", "recipes/sft/lora_tiny.yaml", *overrides]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes and profiles are named relative to the repository root


def test_resume_skips_a_checkpoint_that_was_not_written_to_the_end(tmp_path):
    from tokensieve.launch.run import last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(str(tmp_path / "checkpoint-6")) is None
