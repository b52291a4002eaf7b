"""SIGKILL a training run mid-way, rerun the same command: it resumes from the last checkpoint and ends with the
same parameters and final loss as a run that was never interrupted (every trainer, CPU, fixed seeds)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_base
from tokensieve.launch.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE = 16, 4
ROWS = [{"prompt": f"record {i} : key k{i % 5} maps to v{(i * 3) % 7} ? copy k{i % 5}",
         "completion": f" v{(i * 3) % 7}"} for i in range(64)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("resume")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    save_tiny_base(folder / "base", tiny_tokenizer)
    return folder, data


def command(recipe: str, out: Path, data: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tokensieve", "train", str(REPO_ROOT / recipe),
            "--training.output_dir", str(out), "--data.datasets", json.dumps([{"path": str(data)}]),
            "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE),
            "--save_total_limit", "2", "--resume_from_checkpoint", "true", "--report_to", "none",
            "--logging_steps", "1", "--per_device_train_batch_size", "4", "--seed", "3"] + extra


CASES = {
    "sft": ("recipes/sft/lora_tiny.yaml", ["--model.from_scratch.hidden_size", "32", "--data.eval_datasets", "[]",
                                            "--eval_strategy", "no", "--lr_scheduler_type", "linear"]),
    "token_loss": ("recipes/tiny/sstoken.yaml", ["--model.from_scratch", "null", "--model.name_or_path", "{base}",
                                                 "--history_model", "ema", "--ema_alpha", "0.5", "--data.eval_datasets",
                                                 "[]"]),
    "trim_kv": ("recipes/tiny/trim_kv.yaml", ["--model.name_or_path", "{base}", "--gate_intermediate_size", "8",
                                              "--memory_size", "4"]),
    "query_selector": ("recipes/tiny/query_selector.yaml", ["--model.name_or_path", "{base}",
                                                            "--budget_hidden", "8"]),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def final_state(out: Path) -> dict:
    """Every tensor the run exported (adapter, gates, selector, EMA-free model weights)."""
    state = {}
    for file in sorted(out.glob("*.safetensors")):
        state.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return state


def last_loss(out: Path) -> float:
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e][-1]


@pytest.mark.parametrize("method", list(CASES))
def test_sigkill_then_rerun_matches_an_uninterrupted_run(setup, tmp_path, method):
    folder, data = setup
    recipe, extra = CASES[method]
    extra = [x.format(base=folder / "base") for x in extra]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(command(recipe, whole, data, extra)[3:]) == 0  # the uninterrupted run, in this process

    process = subprocess.Popen(command(recipe, cut, data, extra), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (cut / f"checkpoint-{SAVE}" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (cut / "train_results.json").exists()  # it really died mid-way
    resumed = subprocess.run(command(recipe, cut, data, extra), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = final_state(whole), final_state(cut)
    assert expected and expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-6), key
    assert last_loss(cut) == pytest.approx(last_loss(whole), rel=1e-6)
