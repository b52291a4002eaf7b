"""Every bad input of the bad-input table (docs/bad_inputs.md) through the command line: one line on stderr naming the
thing, exit 2, no traceback (the table and this file list the same case ids)."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tokensieve.launch.cli import main
from tokensieve.launch.model import FromScratchArguments, build_config

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"what is k{i} ?", "completion": f" v{i % 7}"} for i in range(16)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, data: Path | None = None, method="sft", training=None, **sections) -> Path:
    raw = {
        "method": method,
        "model": {"from_scratch": {"architecture": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
                                   "vocab_size": 300}},
        "data": {"datasets": [{"path": str(data or write_jsonl(tmp_path / "train.jsonl", ROWS))}]},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": "none", "use_cpu": True,
                     "bf16": False, "activation_checkpointing": False, "save_strategy": "no",
                     **(training or {})},
    }
    for key, value in sections.items():
        raw[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_model_dir(tmp_path: Path, tokenizer, name: str, architecture="qwen3", **sizes) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(FromScratchArguments(architecture=architecture, **sizes),
                                                          tokenizer))
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gates_export(tmp_path, tokenizer, base: Path, name="gates") -> Path:
    from tokensieve.launch.export import save_gates
    from tokensieve.selectors.attention import attach_gates

    model = AutoModelForCausalLM.from_pretrained(base)
    attach_gates(model, intermediate_size=8)
    return save_gates(model, tmp_path / name, memory_size=8)


# Each case: (id, function(tmp_path, tokenizer) -> argv, regex the one-line message must match).
def _unknown_section(t, tok):
    return ["train", str(recipe(t, extras={"a": 1}))]


def _unknown_training_key(t, tok):
    return ["train", str(recipe(t, training={"learnin_rate": 1e-3}))]


def _wrong_type(t, tok):
    return ["train", str(recipe(t, training={"learning_rate": "fast"}))]


def _select_ratio_range(t, tok):
    return ["train", str(recipe(t, method="token_loss", training={"select_ratio": 1.5}))]


def _gamma_range(t, tok):
    return ["train", str(recipe(t, method="token_loss", training={"gamma": -0.1}))]


def _rho1_without_reference(t, tok):
    return ["train", str(recipe(t, method="token_loss", training={"token_scorer": "rho1"}))]


def _memory_size_range(t, tok):
    return ["train", str(recipe(t, method="trim_kv", training={"memory_size": 0}))]


def _init_gates_missing(t, tok):
    return ["train", str(recipe(t, method="trim_kv", training={"init_gates": str(t / "no-gates")}))]


def _rho_range(t, tok):
    return ["train", str(recipe(t, method="query_selector", training={"rho_min": 0.6, "rho_max": 0.5}))]


def _missing_profile(t, tok):
    return ["train", str(recipe(t, launch={"num_processes": 2, "profile": "zero9"}))]


def _recipe_not_found(t, tok):
    return ["train", str(t / "nope.yaml")]


def _invalid_yaml(t, tok):
    (t / "bad.yaml").write_text("method: sft\nmodel: [unclosed\n")
    return ["train", str(t / "bad.yaml")]


def _missing_section(t, tok):
    path = recipe(t)
    raw = yaml.safe_load(path.read_text())
    del raw["data"]
    path.write_text(yaml.safe_dump(raw))
    return ["train", str(path)]


def _unknown_method(t, tok):
    return ["train", str(recipe(t, method="magic"))]


def _override_without_value(t, tok):
    return ["train", str(recipe(t)), "--learning_rate"]


def _unknown_override(t, tok):
    return ["train", str(recipe(t)), "--learnin_rate", "1e-3"]


def _curriculum_needs_sequential(t, tok):
    data = write_jsonl(t / "first.jsonl", ROWS)
    path = recipe(t)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["curriculum"] = [{"path": str(data)}]
    path.write_text(yaml.safe_dump(raw))
    return ["train", str(path)]


def _data_file_missing(t, tok):
    return ["train", str(recipe(t, data=t / "missing.jsonl"))]


def _missing_column(t, tok):
    return ["train", str(recipe(t, data=write_jsonl(t / "d.jsonl", [{"prompt": "a"}])))]


def _empty_file(t, tok):
    (t / "empty.jsonl").write_text("")
    return ["train", str(recipe(t, data=t / "empty.jsonl"))]


def _empty_completion(t, tok):
    return ["train", str(recipe(t, data=write_jsonl(t / "d.jsonl", ROWS[:3] + [{"prompt": "x", "completion": ""}])))]


def _non_utf8(t, tok):
    (t / "latin.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": " x"}\n'.encode("latin-1"))
    return ["train", str(recipe(t, data=t / "latin.jsonl"))]


def _unsupported_extension(t, tok):
    (t / "data.xlsx").write_text("x")
    return ["train", str(recipe(t, data=t / "data.xlsx"))]


def _token_weights_length(t, tok):
    rows = [dict(r, token_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) for r in ROWS]
    return ["train", str(recipe(t, data=write_jsonl(t / "w.jsonl", rows), method="token_loss",
                                training={"token_scorer": "column"}))]


def _history_column_missing(t, tok):
    return ["train", str(recipe(t, method="token_loss", training={"history_model": "offline"}))]


def _model_path_missing(t, tok):
    path = recipe(t)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"name_or_path": str(t / "no-model")}
    path.write_text(yaml.safe_dump(raw))
    return ["train", str(path)]


def _gates_other_architecture(t, tok):
    export = gates_export(t, tok, tiny_model_dir(t, tok, "qwen3"))
    config = json.loads((export / "gates.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir(t, tok, "llama", architecture="llama"))
    (export / "gates.json").write_text(json.dumps(config))
    return ["generate", str(export), "--prompt", "hello"]


def _gates_other_size(t, tok):
    export = gates_export(t, tok, tiny_model_dir(t, tok, "small"))
    config = json.loads((export / "gates.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir(t, tok, "wide", hidden_size=96, intermediate_size=128))
    (export / "gates.json").write_text(json.dumps(config))
    return ["generate", str(export), "--prompt", "hello"]


def _gates_base_not_prepared(t, tok):
    export = gates_export(t, tok, tiny_model_dir(t, tok, "base"))
    config = json.loads((export / "gates.json").read_text())
    config["base_model_name_or_path"] = "../models/not-prepared"  # as a shipped export names its base
    (export / "gates.json").write_text(json.dumps(config))
    return ["generate", str(export), "--prompt", "hello"]


def _gates_truncated(t, tok):
    export = gates_export(t, tok, tiny_model_dir(t, tok, "base"))
    data = (export / "gates.safetensors").read_bytes()
    (export / "gates.safetensors").write_bytes(data[: len(data) // 3])
    return ["generate", str(export), "--prompt", "hello"]


def _adapter_base_mismatch(t, tok):
    from peft import LoraConfig, get_peft_model

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir(t, tok, "other", hidden_size=96, intermediate_size=128))
    export = gates_export(t, tok, tiny_model_dir(t, tok, "base"))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(export)
    return ["generate", str(export), "--prompt", "hello"]


def _not_a_selector_export(t, tok):
    return ["generate", str(tiny_model_dir(t, tok, "base")), "--selector", "--prompt", "a ? b"]


def selector_export(t, tok, base: Path) -> Path:
    from tokensieve.selectors.query_selector import QuerySelector
    from tokensieve.trainers.query_selector import QuerySelectorConfig, attach_selector, save_selector

    model = AutoModelForCausalLM.from_pretrained(base)
    attach_selector(model, QuerySelector(model.config.hidden_size, num_heads=2, budget_hidden=8))
    args = QuerySelectorConfig(output_dir=str(t / "unused"), report_to="none", use_cpu=True, bf16=False)
    return save_selector(model, t / "selector", args)


def _selector_empty_context(t, tok):
    export = selector_export(t, tok, tiny_model_dir(t, tok, "base"))
    return ["generate", str(export), "--selector", "--context", "", "--query", " ? copy k3"]


def _selector_query_too_long(t, tok):
    export = selector_export(t, tok, tiny_model_dir(t, tok, "base", max_position_embeddings=64))
    return ["generate", str(export), "--selector", "--context", "record 3 : key k3", "--query", " ?" + " copy" * 80]


def _gates_policy_without_export(t, tok):
    return ["generate", str(tiny_model_dir(t, tok, "base")), "--prompt", "hello"]


def _generate_without_prompt(t, tok):
    return ["generate", str(tiny_model_dir(t, tok, "base")), "--policy", "streaming"]


def _eval_data_missing(t, tok):
    return ["eval", str(tiny_model_dir(t, tok, "base")), "--data", str(t / "missing.jsonl")]


def _data_make_unknown_task(t, tok):
    return ["data", "make", "sudoku", "--out", str(t / "x")]


def _resume_folder_missing(t, tok):
    return ["train", str(recipe(t, training={"resume_from_checkpoint": str(t / "no-checkpoint")}))]


def _curate_bad_scorer(t, tok):
    path = t / "curate.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "data": {"datasets": [{"path": "y"}]},
                                    "curate": {"output": str(t / "o.jsonl"), "scorer": "magic"}}))
    return ["curate", str(path)]


def _wandb_without_login(t, tok):
    import wandb

    wandb.teardown()  # forget the offline mode the tests run in (wandb keeps its settings once set up)
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": str(t), "NETRC": str(t / "no-netrc")}
    return ["train", str(recipe(t, training={"report_to": ["wandb"]}))], env


def _gguf_missing(t, tok):
    return ["model", "convert", str(t / "absent.gguf"), "--out", str(t / "out")]


def _prepare_unknown(t, tok):
    return ["model", "prepare", "gpt5"]


def _real_task_without_tokenizer(t, tok):
    return ["data", "make", "passkey", "--out", str(t / "x")]


def _eval_unknown_metric(t, tok):
    model = tiny_model_dir(t, tok, "model")
    data = write_jsonl(t / "test.jsonl", [{"prompt": "what is k1 ?", "completion": " v1", "metric": "fuzzy"}])
    return ["eval", str(model), "--data", str(data)]


def _eval_size_and_ratio(t, tok):
    data = write_jsonl(t / "test.jsonl", ROWS[:2])
    return ["eval", str(tiny_model_dir(t, tok, "model")), "--data", str(data), "--memory-size", "8",
            "--memory-ratio", "0.1", "--policy", "streaming"]


def _eval_decayed_without_gates(t, tok):
    data = write_jsonl(t / "test.jsonl", ROWS[:2])
    return ["eval", str(tiny_model_dir(t, tok, "model")), "--data", str(data), "--memory-size", "8",
            "--policy", "h2o", "--attention", "decayed"]


CASES = [
    ("recipe-unknown-section", _unknown_section, r"unknown key 'extras'"),
    ("recipe-unknown-key", _unknown_training_key, r"training\.learnin_rate.*learning_rate"),
    ("recipe-wrong-type", _wrong_type, r"training\.learning_rate"),
    ("recipe-select-ratio-out-of-range", _select_ratio_range, r"select_ratio must be in \(0, 1\]"),
    ("recipe-gamma-out-of-range", _gamma_range, r"gamma must be in \[0, 1\]"),
    ("recipe-rho1-without-reference", _rho1_without_reference, r"reference_model must be a model trained on clean data"),
    ("recipe-memory-size-below-1", _memory_size_range, r"memory_size must be >= 1"),
    ("recipe-init-gates-missing", _init_gates_missing, r"init_gates: .*no-gates: no gates\.json"),
    ("recipe-rho-bounds", _rho_range, r"rho_min/rho_max"),
    ("recipe-missing-launch-profile", _missing_profile, r"zero9"),
    ("recipe-not-found", _recipe_not_found, r"recipe not found"),
    ("recipe-invalid-yaml", _invalid_yaml, r"not valid YAML"),
    ("recipe-missing-section", _missing_section, r"missing required section 'data'"),
    ("recipe-unknown-method", _unknown_method, r"unknown method 'magic'"),
    ("override-without-value", _override_without_value, r"learning_rate"),
    ("override-unknown-key", _unknown_override, r"learnin_rate"),
    ("curriculum-without-sequential", _curriculum_needs_sequential, r"train_sampling_strategy: sequential"),
    ("data-file-missing", _data_file_missing, r"missing\.jsonl"),
    ("data-missing-column", _missing_column, r"completion"),
    ("data-empty-file", _empty_file, r"empty\.jsonl"),
    ("data-empty-completion", _empty_completion, r"example 3.*completion"),
    ("data-non-utf8", _non_utf8, r"UTF-8"),
    ("data-unsupported-extension", _unsupported_extension, r"\.xlsx"),
    ("data-token-weights-length", _token_weights_length, r"example \d+: column 'token_weights' has 7 values"),
    ("data-history-column-missing", _history_column_missing, r"column 'history_loss'"),
    ("model-path-missing", _model_path_missing, r"no-model"),
    ("gates-other-architecture", _gates_other_architecture, r"architecture"),
    ("gates-other-size", _gates_other_size, r"hidden_size"),
    ("gates-base-not-prepared", _gates_base_not_prepared,
     r"gates\.json: its base model folder \.\./models/not-prepared does not exist .*tokensieve model prepare"),
    ("gates-truncated-file", _gates_truncated, r"truncated or corrupt"),
    ("adapter-base-mismatch", _adapter_base_mismatch, r"LoRA adapter does not fit"),
    ("selector-export-missing", _not_a_selector_export, r"no selector\.json"),
    ("selector-empty-context", _selector_empty_context, r"example 0: the context is empty"),
    ("selector-query-too-long", _selector_query_too_long, r"take 8\d tokens and max_position_embeddings is 64"),
    ("generate-gates-policy-without-export", _gates_policy_without_export, r"needs a retention-gate export"),
    ("generate-without-prompt", _generate_without_prompt, r"--prompt"),
    ("eval-data-missing", _eval_data_missing, r"missing\.jsonl"),
    ("data-make-unknown-task", _data_make_unknown_task, r"sudoku"),
    ("resume-folder-missing", _resume_folder_missing, r"no-checkpoint"),
    ("curate-unknown-scorer", _curate_bad_scorer, r"curate: scorer must be one of"),
    ("report-to-wandb-without-login", _wandb_without_login, r"report_to includes wandb, but W&B cannot log in"),
    ("gguf-file-missing", _gguf_missing, r"GGUF file not found: .*absent\.gguf"),
    ("prepare-unknown-model", _prepare_unknown, r"unknown packaged model 'gpt5'"),
    ("data-make-real-task-without-tokenizer", _real_task_without_tokenizer, r"passkey.*needs --tokenizer DIR"),
    ("eval-unknown-metric", _eval_unknown_metric, r"test\.jsonl: column 'metric' has \['fuzzy'\]"),
    ("eval-memory-size-and-ratio", _eval_size_and_ratio, r"--memory-size or --memory-ratio, not both"),
    ("eval-decayed-attention-without-gates", _eval_decayed_without_gates,
     r"--attention: attention 'decayed' needs the gates' log beta \(policy 'gates'\), got policy 'h2o'"),
]


@pytest.mark.parametrize("case, build, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(case, build, pattern, tmp_path, tiny_tokenizer, capsys, monkeypatch):
    argv = build(tmp_path, tiny_tokenizer)
    if isinstance(argv, tuple):  # (argv, environment variables to set, or to unset where None)
        argv, env = argv
        for key, value in env.items():
            monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def test_the_table_lists_every_case():
    table = (REPO_ROOT / "docs/bad_inputs.md").read_text()
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert documented == [c[0] for c in CASES]
    assert len(documented) >= 25
