"""The tiny recall base model: trained from scratch by recipes/base/tiny_recall.yaml, it must solve both tasks.

Slow (a few minutes on two CPU cores): run with `pytest -m slow`.
"""

import pytest

from tokensieve.data.synthetic import make_task
from tokensieve.launch.evaluate import evaluate_files
from tokensieve.launch.launcher import launch

# The training sizes of recipes/base/tiny_recall.sh.
TRAIN_ROWS = {"induction": 22400, "mqar": 9600, "needle-qa": 16000}


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="not reached yet: the induction warm-up converged in time in a plain training loop (then mqar 99.5% "
    "after 200 recall steps) but in none of three recipe runs; see recipes/base/tiny_recall.yaml",
)
def test_tiny_recall_base_reaches_95_percent_exact_match(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    for task, n in TRAIN_ROWS.items():
        make_task(task, tmp_path / "data" / task, n=n)
    out = tmp_path / "base"
    overrides = [
        "--data.curriculum.0.path", str(tmp_path / "data/induction/train.jsonl"),
        "--data.datasets.0.path", str(tmp_path / "data/mqar/train.jsonl"),
        "--data.datasets.1.path", str(tmp_path / "data/needle-qa/train.jsonl"),
        "--training.output_dir", str(out), "--report_to", "none",
    ]
    launch(repo_root / "recipes/base/tiny_recall.yaml", overrides)
    results = evaluate_files(str(out), ["data/tasks/mqar/test.jsonl", "data/tasks/needle-qa/test.jsonl"])
    for path, result in results.items():
        assert result["exact_match"] >= 0.95, (path, result)
