"""Every trainer under DDP, DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU processes through `tokensieve train`: the first
5 logged losses equal a 1-process run with the whole batch (1e-4 relative). Slow: `.ci/run` runs them in a step
of their own (`pytest -m multiprocess`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_base

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"record {i} : key k{i % 5} maps to v{(i * 3) % 7} ? copy k{i % 5}",
         "completion": f" v{(i * 3) % 7}" * (1 + i % 3)} for i in range(64)]
METHODS = {
    "sft": ("recipes/sft/lora_tiny.yaml", ["--model.from_scratch", "null", "--data.eval_datasets", "[]",
                                            "--eval_strategy", "no"]),
    "token_loss": ("recipes/tiny/sstoken.yaml", ["--model.from_scratch", "null", "--data.eval_datasets", "[]"]),
    "trim_kv": ("recipes/tiny/trim_kv.yaml", ["--gate_intermediate_size", "8", "--memory_size", "4"]),
    "query_selector": ("recipes/tiny/query_selector.yaml", ["--budget_hidden", "8", "--gumbel", "false"]),
}
PROFILES = ["cpu-ddp", "cpu-zero2", "cpu-zero3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("dist")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    save_tiny_base(folder / "base", tiny_tokenizer)
    return folder, {}


def losses(folder: Path, method: str, out: Path, processes: int, batch: int, profile: str | None) -> list[float]:
    recipe, extra = METHODS[method]
    command = [sys.executable, "-m", "tokensieve", "train", str(REPO_ROOT / recipe),
               "--model.name_or_path", str(folder / "base"), "--training.output_dir", str(out),
               "--data.datasets", json.dumps([{"path": str(folder / "train.jsonl")}]), "--max_steps", "5",
               "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
               "--per_device_train_batch_size", str(batch), "--train_sampling_strategy", "sequential",
               "--resume_from_checkpoint", "false", "--launch.num_processes", str(processes),
               "--launch.profile", profile or "null"] + extra
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_match_one_with_the_whole_batch(setup, tmp_path, method, profile):
    folder, single = setup
    if method not in single:
        single[method] = losses(folder, method, tmp_path / "single", 1, 8, None)
    double = losses(folder, method, tmp_path / profile, 2, 4, profile)
    assert len(single[method]) == len(double) == 5
    for a, b in zip(single[method], double):
        assert abs(a - b) <= 1e-4 * abs(a), (method, profile, single[method], double)
