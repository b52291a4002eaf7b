"""The tiny recall base model: trained from scratch by recipes/base/tiny_recall.sh's data and train lines, it
must solve both tasks.

Slow (a few minutes on two CPU cores): run with `pytest -m slow`.
"""

import pytest

from tokensieve.launch.cli import main
from tokensieve.launch.evaluate import evaluate_files
from tokensieve.launch.launcher import launch
from tokensieve.launch.quickstart import BASE_SCRIPT, data_overrides, script_commands, with_out


@pytest.mark.slow
def test_tiny_recall_base_reaches_95_percent_exact_match(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    commands = script_commands(repo_root / BASE_SCRIPT)  # the script's own lines, data written under tmp_path
    folders = {}
    for tokens in (c for c in commands if c[:2] == ["data", "make"]):
        source = with_out(tokens, tmp_path)[1]
        folders[source] = tmp_path / "data" / source.replace("/", "_")
        assert main(with_out(tokens, folders[source])[0]) == 0
    (train,) = [c for c in commands if c[0] == "train"]
    recipe = repo_root / train[1]
    out = tmp_path / "base"
    launch(recipe, train[2:] + data_overrides(recipe, folders) + ["--training.output_dir", str(out),
                                                                 "--report_to", "none"])
    results = evaluate_files(str(out), ["data/tasks/mqar/test.jsonl", "data/tasks/needle-qa/test.jsonl"])
    for path, result in results.items():
        assert result["exact_match"] >= 0.95, (path, result)
