"""Recipe parsing: strict keys, type checks, overrides, and every shipped recipe validates."""

from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from trl import SFTConfig

from tokensieve.errors import RecipeError
from tokensieve.launch.methods import METHODS
from tokensieve.launch.model import FromScratchArguments
from tokensieve.launch.recipe import LaunchArguments, load_curate_recipe, load_recipe, parse_overrides, read_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))

BASE = {
    "method": "sft",
    "model": {"from_scratch": {"architecture": "qwen3", "hidden_size": 32}},
    "data": {"datasets": [{"path": "data/x.jsonl"}]},
    "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "training": {"output_dir": "out", "learning_rate": 1e-3, "bf16": False, "use_cpu": True,
                 "report_to": "none", "activation_checkpointing": False},
}


def write(tmp_path, recipe=None, text=None) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(recipe or BASE), encoding="utf-8")
    return path


def test_parses_every_section(tmp_path):
    recipe = load_recipe(write(tmp_path))
    assert recipe.method == "sft"
    assert isinstance(recipe.training, SFTConfig) and recipe.training.learning_rate == 1e-3
    assert isinstance(recipe.model.from_scratch, FromScratchArguments)
    assert recipe.model.from_scratch.architecture == "qwen3" and recipe.model.from_scratch.hidden_size == 32
    assert recipe.data.datasets[0].path == "data/x.jsonl"
    assert recipe.peft == {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    assert recipe.launch == LaunchArguments()  # defaults: one process in this process


def test_overrides_dotted_bare_and_equals(tmp_path):
    recipe = load_recipe(write(tmp_path), [
        "--training.learning_rate", "1e-4",      # YAML 1.2 float, not the string "1e-4"
        "--max_steps", "7",                      # bare keys belong to training
        "--model.from_scratch.num_hidden_layers=3",
        "--data.datasets.0.path", "other.jsonl",
        "--peft.r", "4",
        "--launch.num_processes", "2",
        "--eval_strategy", "no",                 # stays the string "no", not False
    ])
    assert recipe.training.learning_rate == 1e-4 and recipe.training.max_steps == 7
    assert recipe.model.from_scratch.num_hidden_layers == 3
    assert recipe.data.datasets[0].path == "other.jsonl"
    assert recipe.peft["r"] == 4 and recipe.launch.num_processes == 2
    assert recipe.training.eval_strategy == "no"
    assert recipe.raw["training"]["max_steps"] == 7


def test_override_can_drop_peft(tmp_path):
    assert load_recipe(write(tmp_path), ["--peft", "null"]).peft is None


@pytest.mark.parametrize("section,key,wrong,fix", [
    (None, "trainig", {}, "training"),
    ("training", "learning_rat", 1e-4, "learning_rate"),
    ("model", "name_or_pth", "x", "name_or_path"),
    ("launch", "num_proceses", 2, "num_processes"),
])
def test_unknown_key_names_dotted_key_and_suggestion(tmp_path, section, key, wrong, fix):
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    (recipe.setdefault(section, {}) if section else recipe)[key] = wrong
    path = write(tmp_path, recipe)
    dotted = f"{section}.{key}" if section else key
    with pytest.raises(RecipeError, match=rf"{path}: unknown key '{dotted}'; did you mean '{fix}'"):
        load_recipe(path)


def test_unknown_nested_keys(tmp_path):
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    recipe["model"]["from_scratch"]["hiden_size"] = 8
    with pytest.raises(RecipeError, match=r"unknown key 'model.from_scratch.hiden_size'; did you mean 'hidden_size'"):
        load_recipe(write(tmp_path, recipe))
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    recipe["peft"]["zzz"] = 1
    with pytest.raises(RecipeError, match=r"unknown key 'peft.zzz'; allowed keys are the fields of LoraConfig"):
        load_recipe(write(tmp_path, recipe))
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    recipe["data"]["datasets"][0]["pth"] = "x"
    with pytest.raises(RecipeError, match=r"data\.datasets\[0\].*pth"):
        load_recipe(write(tmp_path, recipe))


def test_unknown_bare_override(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'training.learning_rat'.*'learning_rate'.*--learning_rat"):
        load_recipe(write(tmp_path), ["--learning_rat", "1"])
    with pytest.raises(RecipeError, match=r"unknown key 'nosection.x'"):
        load_recipe(write(tmp_path), ["--nosection.x", "1"])


@pytest.mark.parametrize("override,message", [
    (["--learning_rate", "fast"], r"training.learning_rate: expected float, got 'fast' \(str\)"),
    (["--max_steps", "2.5"], r"training.max_steps: expected int, got 2.5 \(float\)"),
    (["--use_cpu", "1"], r"training.use_cpu: expected bool, got 1 \(int\)"),
    (["--report_to", "{a: 1}"], r"training.report_to: expected None or str or list\[str\]"),
    (["--lr_scheduler_type", "wavy"], r"training.lr_scheduler_type: expected one of 'linear', 'cosine'"),
    (["--model.from_scratch.architecture", "gpt2"], r"model.from_scratch.architecture: expected one of 'llama'"),
    (["--peft.bias", "some"], r"peft.bias: expected one of 'none', 'all', 'lora_only'"),
    (["--peft.target_modules", "[1, 2]"], r"peft.target_modules\[0\]: expected str, got 1"),
    (["--launch.extra_args", "--x"], r"launch.extra_args: expected list\[str\]"),
])
def test_type_errors_name_key_file_expected_and_got(tmp_path, override, message):
    path = write(tmp_path)
    with pytest.raises(RecipeError, match=rf"^{path}: {message}"):
        load_recipe(path, override)


def test_int_is_accepted_for_float(tmp_path):
    assert load_recipe(write(tmp_path), ["--learning_rate", "1"]).training.learning_rate == 1.0


@pytest.mark.parametrize("override,message", [
    (["--launch.num_processes", "0"], "num_processes must be >= 1"),
    (["--launch.num_machines", "2", "--launch.num_processes", "2"], "main_process_ip is required"),
    (["--launch.num_machines", "2"], "must be >= num_machines"),
    (["--launch.machine_rank", "1"], "machine_rank must be in 0 .. 0"),
    (["--launch.main_process_port", "70000"], "main_process_port must be in 1 .. 65535"),
    (["--launch.profile", "zero9"], "unknown profile 'zero9'"),
    (["--launch.profile", "missing/profile.yaml"], "profile file not found"),
    (["--model.from_scratch.num_key_value_heads", "3"], "multiple of num_key_value_heads"),
    (["--model.name_or_path", "x"], "exactly one of model.name_or_path and model.from_scratch"),
    (["--peft.layers_pattern", "layers"], r"peft: `layers_pattern` cannot be used"),
])
def test_range_errors(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path), override)


def test_file_level_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, text="method: [sft\n"))
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(write(tmp_path, text="- a\n- b\n"))
    with pytest.raises(RecipeError, match="missing required section 'data'"):
        load_recipe(write(tmp_path, {k: v for k, v in BASE.items() if k != "data"}))
    with pytest.raises(RecipeError, match="unknown method 'dpo'; known methods: sft"):
        load_recipe(write(tmp_path), ["--method", "dpo"])


def test_override_into_missing_list_item(tmp_path):
    with pytest.raises(RecipeError, match="there is no item data.datasets.3"):
        load_recipe(write(tmp_path), ["--data.datasets.3.path", "x"])
    with pytest.raises(RecipeError, match=r"data.datasets\[0\].path: expected str, got \{.x.: 1\}"):
        load_recipe(write(tmp_path), ["--data.datasets.0.path.x", "1"])


def test_override_syntax_errors():
    assert parse_overrides(["--a.b", "[1, 2]", "--c=d"]) == [("a.b", [1, 2]), ("c", "d")]
    with pytest.raises(RecipeError, match="missing value"):
        parse_overrides(["--a"])
    with pytest.raises(RecipeError, match="expected --key value"):
        parse_overrides(["a", "1"])


def test_yaml_scalars_follow_yaml_1_2():
    assert read_yaml("a: no\nb: 1e-4\nc: on\nd: true\ne: 3") == {"a": "no", "b": 1e-4, "c": "on", "d": True, "e": 3}


def test_resume_true_means_auto(tmp_path):
    assert load_recipe(write(tmp_path), ["--resume_from_checkpoint", "true"]).training.resume_from_checkpoint == "auto"
    assert load_recipe(write(tmp_path), ["--resume_from_checkpoint", "false"]).training.resume_from_checkpoint is None


def test_registry_has_sft():
    assert issubclass(METHODS["sft"].config_class, SFTConfig)  # TRL's, with TRL's defaults (trainers/base.py)
    # plus eos_loss (default true: TRL's behaviour), which every prompt/completion trainer has
    assert {f.name for f in fields(METHODS["sft"].config_class)} == {f.name for f in fields(SFTConfig)} | {"eos_loss"}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO_ROOT)) for p in SHIPPED])
def test_shipped_recipe_validates(path):
    text = path.read_text(encoding="utf-8")
    if "\ncurate:" in text:  # a curation recipe (tokensieve curate)
        assert text.startswith("#") and "tokensieve curate" in text
        recipe = load_curate_recipe(path)
        assert recipe.curate.output
        return
    assert text.startswith("#") and "tokensieve train" in text  # the command that runs it comes first
    overrides = []
    if not torch.cuda.is_available() and "bf16: true" in text:
        overrides = ["--use_cpu", "true"]  # transformers refuses bf16 without a GPU unless use_cpu is set
    recipe = load_recipe(path, overrides)
    assert recipe.method in METHODS
