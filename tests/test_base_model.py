"""The tiny recall base model: trained from scratch by recipes/base/tiny_recall.yaml, it must solve both tasks.

Slow (a few minutes on two CPU cores): run with `pytest -m slow`.
"""

import pytest

from tokensieve.data.synthetic import make_task
from tokensieve.launch.evaluate import evaluate_files
from tokensieve.launch.launcher import launch

# The training data of recipes/base/tiny_recall.sh: the warm-up stages (folder, seed, induction options) in order.
CURRICULUM = [
    ("induction-4-12", 1, 4800, {"min_words": 4, "max_words": 12}),
    ("induction-8-24", 2, 4800, {"min_words": 8, "max_words": 24}),
    ("induction-16-48", 3, 3200, {"min_words": 16, "max_words": 48}),
    ("induction-16-64", 4, 3200, {}),
]
RECALL_ROWS = {"mqar": 8000, "needle-qa": 8000}


@pytest.mark.slow
def test_tiny_recall_base_reaches_95_percent_exact_match(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    overrides = []
    for index, (name, seed, rows, options) in enumerate(CURRICULUM):
        make_task("induction", tmp_path / "data" / name, n=rows, seed=seed, **options)
        overrides += [f"--data.curriculum.{index}.path", str(tmp_path / "data" / name / "train.jsonl")]
    for task, n in RECALL_ROWS.items():
        make_task(task, tmp_path / "data" / task, n=n)
    out = tmp_path / "base"
    overrides += [
        "--data.datasets.0.path", str(tmp_path / "data/mqar/train.jsonl"),
        "--data.datasets.1.path", str(tmp_path / "data/needle-qa/train.jsonl"),
        "--training.output_dir", str(out), "--report_to", "none",
    ]
    launch(repo_root / "recipes/base/tiny_recall.yaml", overrides)
    results = evaluate_files(str(out), ["data/tasks/mqar/test.jsonl", "data/tasks/needle-qa/test.jsonl"])
    for path, result in results.items():
        assert result["exact_match"] >= 0.95, (path, result)
