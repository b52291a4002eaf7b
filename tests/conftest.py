"""Shared fixtures: offline settings, a tiny tokenizer and tiny llama/qwen2/qwen3 models built without a hub."""

import os

# Set before transformers / huggingface_hub / wandb are imported: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["DS_ACCELERATOR"] = "cpu"
# Tiny models gain nothing from threads, and on a shared 2-core machine oversubscription makes steps ~40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_TEXTS = [
    f"record {i} : key k{i % 17} maps to value v{(i * 7) % 23} ; copy the value" for i in range(200)
] + ["sort the words : mule emu bread pig moth gull wasp", "hello world"] * 20


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (recipes, data files and launch profiles are found from here)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """Texts to train tiny tokenizers on."""
    return list(TINY_TEXTS)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer of 300 tokens trained on TINY_TEXTS."""
    from tokensieve.launch.tokenizer import build_tokenizer

    return build_tokenizer(TINY_TEXTS, vocab_size=300)


def _tiny_model(architecture: str, tokenizer):
    import torch

    from tokensieve.launch.model import FromScratchArguments, build_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = build_config(FromScratchArguments(architecture=architecture, max_position_embeddings=128), tokenizer)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def tiny_model(request, tiny_tokenizer):
    """(architecture, model): a ~0.1M-parameter model of each supported architecture, built from scratch."""
    return request.param, _tiny_model(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """A tiny Llama model (for tests that need just one architecture)."""
    return _tiny_model("llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def sft_data_dir(tmp_path_factory) -> Path:
    """A small prompt/completion dataset: train.jsonl (64 rows) and test.jsonl (16 rows)."""
    folder = tmp_path_factory.mktemp("sft_data")
    for split, n in (("train", 64), ("test", 16)):
        rows = [{"prompt": f"what is k{i % 17} ?", "completion": f" v{(i * 7) % 23}", "task": "toy"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture
def tiny_run_overrides(sft_data_dir, tmp_path):
    """A function (output_dir, steps) -> overrides that make recipes/sft/lora_tiny.yaml a few-step,
    offline, no-logging run on the sft_data_dir dataset."""

    def overrides(output_dir: Path | None = None, steps: int = 3) -> list[str]:
        return _overrides(sft_data_dir, output_dir or tmp_path / "run", steps)

    return overrides


def _overrides(data_dir: Path, output_dir: Path, steps: int) -> list[str]:
    return [
        "--data.datasets.0.path", str(data_dir / "train.jsonl"),
        "--data.eval_datasets.0.path", str(data_dir / "test.jsonl"),
        "--training.output_dir", str(output_dir),
        "--max_steps", str(steps),
        "--report_to", "none",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--per_device_train_batch_size", "4",
    ]


def save_tiny_base(folder: Path, tokenizer) -> Path:
    """Save a tiny Qwen3 (hidden 32, 2 layers) with `tokenizer` to `folder`: a local base for recipe runs."""
    import torch

    from tokensieve.launch.model import FromScratchArguments, build_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    spec = FromScratchArguments(architecture="qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=64)
    AutoModelForCausalLM.from_config(build_config(spec, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
