"""`tokensieve quickstart`: the base's data commands read from its script, a failing stage named, and (slow) the
whole run on a tiny base: every export written, reloaded in a fresh process, one table row per method."""

import json
from pathlib import Path

import pytest

from tokensieve.errors import TokensieveError
from tokensieve.launch.cli import main
from tokensieve.launch.quickstart import BASE_SCRIPT, REPO_ROOT, STAGES, TRAINING, data_overrides, script_commands

from conftest import save_tiny_base

EXPORTS = {"reference": "model.safetensors", "sft": "model.safetensors", "rho1": "model.safetensors",
           "prior": "model.safetensors", "sstoken": "model.safetensors", "curate": "model.safetensors",
           "mapped_sft": "model.safetensors", "mapped_sstoken": "model.safetensors",
           "trim_kv": "gates.safetensors", "trim_kv_evict": "gates.safetensors",
           "query_selector": "selector.safetensors"}


def test_base_script_makes_every_dataset_its_recipe_reads(tmp_path):
    """The quickstart runs the base script's `tokensieve data make` lines itself; they must cover the recipe."""
    commands = script_commands(REPO_ROOT / BASE_SCRIPT)
    trains = [c for c in commands if c[0] == "train"]
    assert len(trains) == 1
    made = {c[c.index("--out") + 1]: tmp_path / str(i) for i, c in enumerate(commands) if c[:2] == ["data", "make"]}
    assert made
    overrides = data_overrides(REPO_ROOT / trains[0][1], {**made, "data/tasks": tmp_path / "tasks"})
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    from tokensieve.launch.recipe import read_yaml

    data = read_yaml((REPO_ROOT / trains[0][1]).read_text())["data"]
    for section in ("curriculum", "datasets", "eval_datasets"):
        for i, _ in enumerate(data.get(section) or []):
            assert str(pairs[f"--data.{section}.{i}.path"]).startswith(str(tmp_path)), (section, i)


def test_script_commands_reject_shell_variables(tmp_path):
    script = tmp_path / "x.sh"
    script.write_text('set -e\ntokensieve data make mqar --out "$OUT" >/dev/null\n')
    with pytest.raises(TokensieveError, match="expands a variable"):
        script_commands(script)
    script.write_text('# tokensieve data make x\ntokensieve data make mqar \\\n  --out a --n 4 >/dev/null\n'
                      'tokensieve train r.yaml "$@"\ntokensieve eval "$out" --data x\necho done\n')
    assert script_commands(script) == [["data", "make", "mqar", "--out", "a", "--n", "4"], ["train", "r.yaml"]]


def test_failing_stage_is_named_and_exit_2(tmp_path, capsys):
    base = tmp_path / "broken-base"
    base.mkdir()
    (base / "config.json").write_text("{}")  # looks like a model folder, loads as none
    assert main(["quickstart", "--base", str(base), "--out", str(tmp_path / "qs"), "--steps-scale", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: quickstart stage 'reference' failed:") and "--resume" in err
    assert (tmp_path / "qs/data/stage.json").is_file() and not (tmp_path / "qs/reference/stage.json").exists()
    assert main(["quickstart", "--base", str(tmp_path / "nothing")]) == 2
    assert "not a saved model folder" in capsys.readouterr().err


def test_real_stage_is_checked_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    from tokensieve.launch import quickstart

    monkeypatch.setattr(quickstart, "REAL_MODEL", "models/not-prepared-here")
    assert main(["quickstart", "--real", "--out", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err
    assert "--real: no prepared model in" in err and "tokensieve model prepare smollm2" in err
    assert not (tmp_path / "qs").exists()


@pytest.mark.slow
def test_quickstart_on_a_tiny_base(tmp_path, capsys):
    from tokensieve.launch.tokenizer import build_tokenizer

    # A tokenizer that knows the tasks' words, as the real base's does: the recall prompts then fit max_length.
    texts = [line for task in ("mqar", "needle-qa", "noisy-recall")
             for line in (REPO_ROOT / "data/tasks" / task / "train.jsonl").read_text().splitlines()[:300]]
    base = save_tiny_base(tmp_path / "base", build_tokenizer(texts, vocab_size=1280))
    out = tmp_path / "qs"
    assert main(["quickstart", "--base", str(base), "--out", str(out), "--steps-scale", "0.02",
                 "--test-rows", "8"]) == 0
    for stage, file in EXPORTS.items():
        assert (out / stage / file).is_file(), stage
        assert json.loads((out / stage / "stage.json").read_text())["status"] == "ran"
    assert (out / "curate/curated.parquet").is_file()
    results = json.loads((out / "results.json").read_text())["stages"]
    assert list(results) == [stage.name for stage in STAGES]
    reload = results["reload"]["results"]
    for name in ["base", *EXPORTS, "trim_kv streaming"]:
        # each export was evaluated by its own `python -m tokensieve eval` process, which wrote this file
        written = json.loads((out / "reload" / f"{name.replace(' ', '-')}.json").read_text())
        assert written["model"] == reload[name]["export"]
        assert reload[name]["command"].startswith("-m tokensieve eval ")
        assert all(entry["examples"] == 8 for entry in reload[name]["tasks"].values())
    assert set(reload["base"]["tasks"]) == {"noisy-recall", "mapped-recall", "mqar", "needle-qa"}
    assert set(reload["mapped_sstoken"]["tasks"]) == {"mapped-recall"} and set(reload["rho1"]["tasks"]) == {"noisy-recall"}
    assert reload["trim_kv"]["tasks"]["mqar"]["memory_size"] == 32
    assert reload["trim_kv_evict"]["tasks"]["needle-qa"]["memory_size"] == 32
    assert 0 < reload["query_selector"]["tasks"]["needle-qa"]["kept_share"] <= 1
    table = (out / "results.md").read_text()
    for name in ["base", *TRAINING, "trim_kv streaming"]:
        assert f"\n| {name} |" in table, name
    assert table in capsys.readouterr().out
    assert len(list(Path(out, "wandb").glob("offline-run-*"))) == len(TRAINING)
