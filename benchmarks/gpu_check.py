"""One call on a GPU: every CUDA/bf16 path tested, and the methods measured at real size with random weights.

    python benchmarks/gpu_check.py [--model qwen3-1.7b] [--out outputs/bench/gpu_check]
    python benchmarks/gpu_check.py --cpu-smoke       # a tiny config and small sizes on the CPU: the script works

1. tests: `pytest -m gpu` (tests/test_gpu.py: a bf16 step of every trainer against fp32, the RetentionCache on CUDA
   against the CPU, gate export -> reload on CUDA).
2. measurements on a model built with `from_config` from a shipped config (benchmarks/configs/*.json; no hub, random
   weights: speed and memory do not depend on the weights):
   a. gate-training step vs LoRA SFT step at --train-length tokens: time and peak memory (fused, chunked, flex and
      dense training attention);
   b. decode tokens/s of the RetentionCache (M, buffer) vs the full cache at each --decode-contexts, batch 1 and 8;
   c. ssToken step (history "base" and "offline") / SFT step (LoRA) at --sstoken-length tokens;
   d. query-selector prefill (untrained selector, PromptDistill, GemFilter at 10%) time and KV bytes vs the full
      context at --prefill-context tokens.
Writes gpu_check.json and gpu_check.md into --out; each section's failure is recorded and the next one runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import REPO, environment, environment_lines, finish, training_step_cost

CONFIGS = REPO / "benchmarks/configs"
REAL = {"train_length": 4096, "decode_contexts": [8192, 32768], "decode_batches": [1, 8], "decode_tokens": 32,
        "memory_size": 512, "buffer_size": 128, "sstoken_length": 2048, "prefill_context": 16384, "steps": 3}
SMOKE = {"train_length": 128, "decode_contexts": [256], "decode_batches": [1, 2], "decode_tokens": 4,
         "memory_size": 32, "buffer_size": 8, "sstoken_length": 64, "prefill_context": 256, "steps": 1}


def load_config(name: str):
    """A shipped real-size config (benchmarks/configs/NAME.json) as a transformers config."""
    from transformers import AutoConfig

    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise SystemExit(f"--model: no {path.relative_to(REPO)}; shipped configs: {known}")
    return AutoConfig.for_model(**json.loads(path.read_text()))


class Setup:
    """What every measurement builds on: the config, device, dtype, sizes and a tokenizer for the trainers' dummy
    datasets (the measured batches are random ids, built directly)."""

    def __init__(self, smoke: bool, model: str):
        from tokensieve.launch.model import FromScratchArguments, build_config
        from tokensieve.launch.tokenizer import build_tokenizer

        self.smoke = smoke
        self.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.sizes = dict(SMOKE if smoke else REAL)
        texts = [f"record {i} : key k{i % 17} maps to v{i % 23}" for i in range(200)]
        self.tokenizer = build_tokenizer(texts, vocab_size=300)
        if smoke:
            spec = FromScratchArguments(architecture="qwen3", num_hidden_layers=4, max_position_embeddings=2048)
            self.config, self.model_name = build_config(spec, self.tokenizer), "tiny qwen3 (4 layers)"
        else:
            self.config, self.model_name = load_config(model), model

    def model(self):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(self.device):  # a copy of the config: attaching gates changes the model's config
            return AutoModelForCausalLM.from_config(copy.deepcopy(self.config), dtype=self.dtype)

    def ids(self, batch: int, length: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, self.config.vocab_size, (batch, length), generator=generator).to(self.device)

    def trainer_args(self, tmp: str) -> dict:
        return {"output_dir": tmp, "per_device_train_batch_size": 1, "report_to": "none",
                "use_cpu": self.device == "cpu", "bf16": self.device == "cuda", "activation_checkpointing": False,
                "save_strategy": "no"}

    def batch(self, length: int, history: bool = False) -> dict:
        ids = self.ids(1, length)
        labels = ids.clone()
        labels[:, : length // 2] = -100  # a prompt half, a completion half
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if history:
            batch["history_loss"] = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)).to(self.device)
        return batch


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_cost(setup: Setup, make_trainer, batch: dict) -> dict:
    """training_step_cost of a fresh trainer; an out-of-memory step is recorded as such."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp)
        try:
            return training_step_cost(trainer, batch, setup.sizes["steps"])
        except torch.OutOfMemoryError:
            return {"seconds": math.nan, "step_bytes": math.nan, "error": "out of memory"}
        finally:
            del trainer
            free()


def lora_sft(setup: Setup, tmp: str):
    from datasets import Dataset
    from peft import LoraConfig

    from tokensieve.trainers.guards import GuardedSFTTrainer, SFTBaselineConfig

    return GuardedSFTTrainer(model=setup.model(), args=SFTBaselineConfig(**setup.trainer_args(tmp)),
                             train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}]),
                             processing_class=setup.tokenizer,
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


# --- a. gate training vs LoRA SFT ------------------------------------------------------------------------------------

def gate_training(setup: Setup) -> dict:
    from datasets import Dataset

    from tokensieve.trainers.retention import RetentionConfig, RetentionTrainer

    length = setup.sizes["train_length"]
    batch = setup.batch(length)

    def gates(kernel: str):
        def make(tmp):
            args = RetentionConfig(**setup.trainer_args(tmp), memory_size=setup.sizes["memory_size"],
                                   training_attention=kernel)
            return RetentionTrainer(model=setup.model(), args=args, processing_class=setup.tokenizer,
                                    train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}]))
        return make

    arms = {"lora_sft": lambda tmp: lora_sft(setup, tmp), "gates_fused": gates("fused"),
            "gates_chunked": gates("chunked")}
    if setup.device == "cuda":
        arms["gates_flex"] = gates("flex")  # FlexAttention has no backward pass on the CPU
    arms["gates_dense"] = gates("dense")
    results = {name: step_cost(setup, make, batch) for name, make in arms.items()}
    for name, entry in results.items():
        entry["time_ratio"] = entry["seconds"] / results["lora_sft"]["seconds"]
        entry["memory_ratio"] = entry["step_bytes"] / max(results["lora_sft"]["step_bytes"], 1)
    return {"tokens": length, "arms": results}


# --- b. decode speed -------------------------------------------------------------------------------------------------

@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Feed `ids` into `cache` in chunks (only the last position's logits); the next token [B, 1]."""
    from tokensieve.upstream import with_cache

    for start in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, start:start + chunk], use_cache=True, logits_to_keep=1,
                       **with_cache(model, cache)).logits
    return logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_rate(model, cache, token: torch.Tensor, tokens: int, device: str) -> float:
    """Greedy decoding tokens/s (per row) after one untimed step (which runs the first eviction and its gates)."""
    from tokensieve.upstream import with_cache

    def step(token):
        return model(input_ids=token, use_cache=True, **with_cache(model, cache)).logits[:, -1:].argmax(-1)

    token = step(token)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(tokens):
        token = step(token)
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def decode_speed(setup: Setup) -> dict:
    from transformers import DynamicCache

    from tokensieve.selectors.attention import attach_gates
    from tokensieve.selectors.kv_cache import RetentionCache, cache_bytes

    model = setup.model().eval()
    attach_gates(model)
    memory, buffer, rows = setup.sizes["memory_size"], setup.sizes["buffer_size"], []
    for context in setup.sizes["decode_contexts"]:
        for batch in setup.sizes["decode_batches"]:
            ids, row = setup.ids(batch, context), {"context": context, "batch": batch}
            for name in ("full", "retention"):
                try:
                    if name == "full":
                        cache, chunk = DynamicCache(config=model.config), 4096
                    else:
                        cache, chunk = RetentionCache.for_model(model, memory, buffer), buffer
                    token = prefill(model, ids, cache, chunk)
                    row[f"{name}_tokens_per_s"] = decode_rate(model, cache, token, setup.sizes["decode_tokens"],
                                                              setup.device)
                    row[f"{name}_kv_bytes"] = cache_bytes(cache)
                except torch.OutOfMemoryError:
                    row[f"{name}_tokens_per_s"], row[f"{name}_error"] = math.nan, "out of memory"
                del cache
                free()
            row["speedup"] = row["retention_tokens_per_s"] / row["full_tokens_per_s"]
            rows.append(row)
            print(f"[gpu_check] decode {row}", flush=True)
    del model
    free()
    return {"memory_size": memory, "buffer_size": buffer, "rows": rows}


# --- c. ssToken vs SFT -----------------------------------------------------------------------------------------------

def sstoken_cost(setup: Setup) -> dict:
    from datasets import Dataset

    from tokensieve.launch.model import apply_peft
    from tokensieve.trainers.token_loss import TokenLossConfig, TokenLossTrainer

    length = setup.sizes["sstoken_length"]
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}

    def sstoken(history: str):
        def make(tmp):
            args = TokenLossConfig(**setup.trainer_args(tmp), token_scorer="sstoken", history_model=history)
            rows = [{"prompt": "a", "completion": "b", "history_loss": [1.0, 1.0]}]
            return TokenLossTrainer(model=apply_peft(setup.model(), lora), args=args, processing_class=setup.tokenizer,
                                    train_dataset=Dataset.from_list(rows))
        return make

    results = {"lora_sft": step_cost(setup, lambda tmp: lora_sft(setup, tmp), setup.batch(length)),
               "sstoken_base": step_cost(setup, sstoken("base"), setup.batch(length)),
               "sstoken_offline": step_cost(setup, sstoken("offline"), setup.batch(length, history=True))}
    for entry in results.values():
        entry["time_ratio"] = entry["seconds"] / results["lora_sft"]["seconds"]
        entry["memory_ratio"] = entry["step_bytes"] / max(results["lora_sft"]["step_bytes"], 1)
    return {"tokens": length, "arms": results}


# --- d. query-selector prefill ---------------------------------------------------------------------------------------

@torch.no_grad()
def selector_prefill(setup: Setup) -> dict:
    from tokensieve.selectors.query_selector import QuerySelector
    from tokensieve.trainers.query_selector import attach_selector
    from tokensieve.trainers.selector_lm import SelectorPipeline

    model = setup.model().eval()
    text = setup.config.get_text_config()
    depth = text.num_hidden_layers
    selector = attach_selector(model, QuerySelector(text.hidden_size, num_heads=text.num_attention_heads).to(
        setup.device))
    layer = max(depth // 2 - 1, 0)  # selection layer of PromptDistill / GemFilter: the middle of the network
    pipe = SelectorPipeline(model, setup.tokenizer, selector, feature_layer=1, selection_layer=layer)
    context = setup.sizes["prefill_context"]
    batch = {"context_ids": setup.ids(1, context), "context_mask": torch.ones(1, context, dtype=torch.long,
                                                                                device=setup.device),
             "query_ids": setup.ids(1, 32), "query_mask": torch.ones(1, 32, dtype=torch.long, device=setup.device)}
    results = {}
    for method in ("full", "selector", "promptdistill", "gemfilter"):
        ratio = None if method == "full" else 0.1
        try:
            pipe.prefill(batch, method, ratio=ratio)  # warm-up
            if setup.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            state = pipe.prefill(batch, method, ratio=ratio)
            if setup.device == "cuda":
                torch.cuda.synchronize()
            results[method] = {"seconds": time.perf_counter() - start, "kv_bytes": state.kv_bytes()}
            del state
        except torch.OutOfMemoryError:
            results[method] = {"seconds": math.nan, "kv_bytes": math.nan, "error": "out of memory"}
        free()
    for entry in results.values():
        entry["time_ratio"] = entry["seconds"] / results["full"]["seconds"]
        entry["kv_ratio"] = entry["kv_bytes"] / results["full"]["kv_bytes"]
    del model, pipe
    free()
    return {"context": context, "kept": 0.1, "feature_layer": 1, "selection_layer": layer, "methods": results}


# --- 1. the gpu tests ------------------------------------------------------------------------------------------------

def gpu_tests(timeout: int) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    tail = (done.stdout + done.stderr).strip().splitlines()
    return {"returncode": done.returncode, "seconds": time.perf_counter() - start, "summary": tail[-1] if tail else "",
            "failures": [line for line in tail if line.startswith(("FAILED", "ERROR"))]}


# --- report ----------------------------------------------------------------------------------------------------------

def mib(value) -> str:
    """Bytes in MiB (KiB below one MiB); n/a when not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value / 2**20:,.0f} MiB" if value >= 2**20 else f"{value / 2**10:,.0f} KiB"


def report(results: dict) -> list[str]:
    lines = ["# GPU check: the CUDA/bf16 paths and the methods at real size", ""] + environment_lines(
        results["environment"]) + [f"Model: {results['model']} (random weights, `from_config`), {results['dtype']}.",
                                   ""]
    tests = results["sections"].get("tests")
    if tests:
        lines += [f"**Tests** (`pytest -m gpu`): {tests.get('summary', tests.get('error'))}", ""]
        lines += [f"- {failure}" for failure in tests.get("failures", [])]
    for key, title in (("gate_training", "Gate training step vs LoRA SFT step"),
                       ("sstoken", "ssToken step vs SFT step (LoRA r16)")):
        section = results["sections"].get(key)
        if section is None:
            continue
        if "error" in section:
            lines += [f"**{title}**: failed: {section['error']}", ""]
            continue
        lines += [f"**{title}** ({section['tokens']} tokens, batch 1; median step, peak memory a step adds)", "",
                  "| arm | step (s) | / LoRA SFT | step memory | / LoRA SFT |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {e['seconds']:.3f} | {e['time_ratio']:.2f} | {mib(e['step_bytes'])} | "
                  f"{e['memory_ratio']:.2f} |" for name, e in section["arms"].items()]
        lines.append("")
    decode = results["sections"].get("decode")
    if decode and "error" not in decode:
        lines += [f"**Decode** (RetentionCache M = {decode['memory_size']}, buffer {decode['buffer_size']}, vs the "
                  f"full cache; greedy decoding steps per second, i.e. tokens/s of each row)", "",
                  "| context | batch | full (tok/s) | retention (tok/s) | speed-up | full KV | retention KV |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['context']} | {r['batch']} | {r['full_tokens_per_s']:.1f} | {r['retention_tokens_per_s']:.1f} "
                  f"| {r['speedup']:.2f}x | {mib(r.get('full_kv_bytes'))} | {mib(r.get('retention_kv_bytes'))} |"
                  for r in decode["rows"]]
        lines.append("")
    elif decode:
        lines += [f"**Decode**: failed: {decode['error']}", ""]
    prefill_section = results["sections"].get("prefill")
    if prefill_section and "error" not in prefill_section:
        lines += [f"**Query-selector prefill** ({prefill_section['context']} context tokens, 10% kept; selector "
                  f"features at layer {prefill_section['feature_layer']}, PromptDistill / GemFilter select at layer "
                  f"{prefill_section['selection_layer']})", "",
                  "| method | prefill (s) | / full | KV bytes | / full |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {e['seconds']:.3f} | {e['time_ratio']:.2f} | {mib(e['kv_bytes'])} | {e['kv_ratio']:.2f} |"
                  for m, e in prefill_section["methods"].items()]
    elif prefill_section:
        lines += [f"**Query-selector prefill**: failed: {prefill_section['error']}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-1.7b", help="a config in benchmarks/configs (without .json)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny config, small sizes, CPU, no gpu tests")
    parser.add_argument("--sections", nargs="+", default=["tests", "gate_training", "decode", "sstoken", "prefill"])
    parser.add_argument("--tests-timeout", type=int, default=240)
    parser.add_argument("--out", default=str(REPO / "outputs/bench/gpu_check"))
    args = parser.parse_args()
    setup = Setup(args.cpu_smoke, args.model)
    if not args.cpu_smoke and setup.device != "cuda":
        raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke to check the script on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "model": setup.model_name, "dtype": str(setup.dtype),
               "sizes": setup.sizes, "sections": {}}
    steps = {"tests": lambda: gpu_tests(args.tests_timeout), "gate_training": lambda: gate_training(setup),
             "decode": lambda: decode_speed(setup), "sstoken": lambda: sstoken_cost(setup),
             "prefill": lambda: selector_prefill(setup)}
    for name in args.sections:
        if name == "tests" and args.cpu_smoke:
            continue  # the gpu tests skip without CUDA; the smoke checks the measurements
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            results["sections"][name] = steps[name]()
        except Exception as error:  # record it and go on: one broken path should not hide the others
            results["sections"][name] = {"error": f"{type(error).__name__}: {error}",
                                         "traceback": traceback.format_exc()[-3000:]}
            print(results["sections"][name]["traceback"], flush=True)
        results["sections"][name]["section_seconds"] = time.perf_counter() - start
        free()
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a kill
    lines = report(results)
    finish(out, "gpu_check", lines)
    failed = [name for name, section in results["sections"].items()
              if "error" in section or (name == "tests" and section.get("returncode") not in (0, None))]
    if failed:
        raise SystemExit(f"gpu_check: failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
