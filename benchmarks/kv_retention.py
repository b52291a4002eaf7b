"""Learned KV retention (TRIM-KV) against heuristic eviction at the same budget, plus inference and training cost.

    python benchmarks/kv_retention.py accuracy  [--base outputs/base/tiny_recall] [--budgets 0.1 0.25 0.5]
    python benchmarks/kv_retention.py inference [--memory-size 32]
    python benchmarks/kv_retention.py training  [--steps 20]
    python benchmarks/kv_retention.py training-lengths [--lengths 512 1024 2048 4096]
    python benchmarks/kv_retention.py kernels [--lengths 512 1024 2048 4096]
    python benchmarks/kv_retention.py slots --gates EXPORT [--budgets 0.1 0.25]
    python benchmarks/kv_retention.py robustness [--learning-rates 2.5e-3 5e-3 1e-2] [--max-steps 1200 2400 4800]

accuracy: gates are trained on the base with recipes/tiny/trim_kv.yaml and fine-tuned with eviction by
recipes/tiny/trim_kv_evict.yaml (unless --gates names an export; the soft stage alone is a row of its own), then
every policy answers the mqar and needle-qa test splits with greedy decoding from a RetentionCache: the prompt is
prefilled in chunks of `buffer` tokens and after each chunk the cache is cut back to M = budget x mean prompt
length tokens per (layer, kv head) (buffer = max(1, M // 4)). Policies: gates (TRIM-KV), streaming (StreamingLLM,
4 sinks), h2o, snapkv, knorm, random; "full" is the uncompressed cache.
inference: KV-cache bytes after generating past M (RetentionCache vs the full DynamicCache), and decode tokens/s
at a context of 8 x M for several M (--decode-memory-sizes), full and retention cache alternating in one process.
training: gate-training step time / LoRA SFT step time on the same data and batch size.
slots: for a gates export, the share of the cache's slots each kind of token (mqar key / value / filler / question,
needle-qa needle / fact / question) holds at answer time, per layer and kv head, whether the asked pair survived,
and a retention map PNG of the first row.
training-lengths: step time and step memory of gate training (fused, chunked and dense attention, soft and with
eviction; --arms) vs a LoRA SFT step, one row of T tokens for each --lengths, each measurement in a fresh process.
robustness: the soft stage of recipes/tiny/trim_kv.yaml for every learning rate x max_steps (one seed), each
export scored by `tokensieve eval` on mqar-256 at 22 + 4 slots (10%), mqar at 32 + 8 and needle-qa at 32, 48 and
64 + 8, with plain and with decayed cache attention (--attention); a cell fails when its needle-qa at 32 + 8 is more
than 0.02 below the best cell's. Cells run in --workers parallel processes (threads
split between them); a cell whose scores are already in --out is not run again (so keep one --out per base).
kernels: the training attention kernels (fused, chunked, dense, and plain causal sdpa) and the capacity loss
(factored, and by its definition) on raw tensors: time of forward + backward and error against the reference.
Each writes a markdown table, a JSON of raw numbers and a PNG into --out (default outputs/bench/kv_retention).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from tokensieve.selectors.kv_cache import budget_sizes
from tokensieve.upstream import with_cache

from common import (REPO, environment, environment_lines, finish, pyplot, run_recipe, step_timer,
                    training_step_cost)

TASKS = {"mqar": REPO / "data/tasks/mqar/test.jsonl", "needle-qa": REPO / "data/tasks/needle-qa/test.jsonl",
         # mqar with 256-word contexts, 8 pairs: `tokensieve data make mqar --out data/tasks/mqar-256 --n 1000
         # --seed 7 --context_words 256 --num_pairs 8` (data/tasks/mqar-256/meta.json)
         "mqar-256": REPO / "data/tasks/mqar-256/test.jsonl"}
MQAR_TRAIN = REPO / "data/tasks/mqar/train.jsonl"
POLICIES = ["gates", "streaming", "h2o", "snapkv", "knorm", "random"]
SOFT_ROW = "gates, soft stage only"


def train_gates(base: str, out: Path, steps: int | None) -> tuple[Path, Path]:
    """The two stages of the tiny recipe: soft gates in out/gates, fine-tuned with eviction in out/gates_evict."""
    soft, evict = out / "gates", out / "gates_evict"
    common = ["--model.name_or_path", base, "--report_to", "none", "--save_strategy", "no",
              "--resume_from_checkpoint", "false"]
    with torch.enable_grad():  # `inference` runs under no_grad
        fresh_soft = not (soft / "gates.json").exists()
        if fresh_soft:
            run_recipe("recipes/tiny/trim_kv.yaml", common + ["--training.output_dir", str(soft)]
                       + (["--max_steps", str(steps)] if steps else []))
        if fresh_soft or not (evict / "gates.json").exists():  # never pair new soft gates with an older stage 2
            run_recipe("recipes/tiny/trim_kv_evict.yaml", common + ["--training.output_dir", str(evict),
                                                                    "--init_gates", str(soft)])
    return soft, evict


def read_rows(source, n: int | None) -> list[dict]:
    """The first `n` rows (all if None) of a JSONL file."""
    rows = [json.loads(line) for line in Path(source).open()]
    return rows[:n] if n else rows


def accuracy(args) -> None:
    from tokensieve.launch.evaluate import exact_match
    from tokensieve.launch.export import load_retention_model
    from tokensieve.selectors.kv_cache import RetentionCache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gates:
        gates, soft = Path(args.gates), None
    else:
        soft, gates = train_gates(args.base, out, args.train_steps)
    model, tokenizer = load_retention_model(gates)
    # Each row: (name, model, eviction policy). The soft stage's gates alone, when the benchmark trained both stages.
    arms = [(policy, model, policy) for policy in POLICIES]
    if soft is not None:
        arms.insert(1, (SOFT_ROW, load_retention_model(soft)[0], "gates"))
    results = {"environment": environment(), "gates": str(gates), "soft_gates": soft and str(soft), "base": args.base,
               "budgets": args.budgets, "tasks": {}}
    for task, path in ((task, TASKS[task]) for task in args.tasks):
        rows = read_rows(path, args.test_examples)
        prompts, answers = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        context = sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
        full, _ = exact_match(model, tokenizer, prompts, answers, desc=f"{task} full")
        entry = {"mean_prompt_tokens": context, "full": full, "budgets": {}}
        print(f"[kv_retention] {task}: full cache {full:.3f} (mean prompt {context:.0f} tokens)", flush=True)
        for fraction in args.budgets:
            memory, buffer = budget_sizes(fraction, context)
            scores = {}
            for name, arm_model, policy in arms:
                def make_cache(arm_model=arm_model, policy=policy):
                    return RetentionCache.for_model(arm_model, memory, buffer, policy)

                scores[name], _ = exact_match(arm_model, tokenizer, prompts, answers, make_cache=make_cache,
                                              desc=f"{task} {name} {fraction}")
                print(f"[kv_retention] {task} budget {fraction:.0%} (M={memory}, buffer={buffer}) {name}: "
                      f"{scores[name]:.3f}", flush=True)
            entry["budgets"][str(fraction)] = {"memory_size": memory, "buffer_size": buffer, "exact_match": scores}
        results["tasks"][task] = entry
        (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    write_accuracy_report(out, results)


def write_accuracy_report(out: Path, results: dict) -> None:
    lines = ["# KV retention: exact match vs KV budget", ""] + environment_lines(results["environment"]) + [
        f"Gates: `{results['gates']}`" + (f" (soft stage: `{results['soft_gates']}`)" if results.get("soft_gates") else "")
        + ". Budget = M / mean prompt length; the prompt is prefilled in chunks of `buffer` tokens and each layer "
        "keeps M tokens per kv head after every eviction.", ""]
    plt = pyplot()
    figure, axes = plt.subplots(1, len(results["tasks"]), figsize=(5 * len(results["tasks"]), 3.6), squeeze=False)
    for axis, (task, entry) in zip(axes[0], results["tasks"].items()):
        budgets = list(entry["budgets"])
        lines += [f"## {task} (full cache: {entry['full']:.3f}; mean prompt {entry['mean_prompt_tokens']:.0f} tokens)",
                  "", "| policy | " + " | ".join(f"{float(b):.0%} (M={entry['budgets'][b]['memory_size']})"
                                                  for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for policy in entry["budgets"][budgets[0]]["exact_match"]:
            values = [entry["budgets"][b]["exact_match"][policy] for b in budgets]
            lines.append(f"| {policy} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
            axis.plot([float(b) for b in budgets], values, marker="o", label=policy)
        axis.axhline(entry["full"], color="black", linestyle="--", linewidth=0.8, label="full cache")
        axis.set_title(task)
        axis.set_xlabel("KV budget (share of the prompt)")
        axis.set_ylabel("exact match")
        lines.append("")
    axes[0][0].legend(fontsize=7)
    finish(out, "accuracy", lines, figure)


@torch.no_grad()
def inference(args) -> None:
    from transformers import DynamicCache

    from tokensieve.launch.export import load_retention_model, read_gates_config
    from tokensieve.launch.generate import bounded_generate
    from tokensieve.selectors.kv_cache import RetentionCache, cache_attention, cache_bytes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gates = Path(args.gates) if args.gates else train_gates(args.base, out, args.train_steps)[1]
    model, tokenizer = load_retention_model(gates)
    decayed = cache_attention(read_gates_config(gates), args.attention, "gates")
    memory, buffer = args.memory_size, max(1, args.memory_size // 4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, vocab, (1, 8), generator=generator)
    rows = []
    for new_tokens in [memory // 2, memory, 2 * memory, 4 * memory, 8 * memory]:
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        full = DynamicCache(config=model.config)
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **with_cache(model, full), **options)
        bounded = RetentionCache.for_model(model, memory, buffer)
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **with_cache(model, bounded), **options)
        full_bytes = cache_bytes(full)
        rows.append({"tokens": prompt.shape[1] + new_tokens, "full_kv_bytes": full_bytes,
                     "retention_kv_bytes": bounded.nbytes(), "ratio": bounded.nbytes() / full_bytes,
                     "bound": (memory + buffer) / (prompt.shape[1] + new_tokens)})
    speed = {}
    for decode_memory in args.decode_memory_sizes:  # decode at a context of 8 x M, full and retention alternating
        decode_buffer = max(1, decode_memory // 4)
        context = torch.randint(10, vocab, (1, 8 * decode_memory), generator=generator)
        # "short": a full cache that only ever holds M + buffer / 2 tokens (the retention cache's mean length between
        # evictions), cut back after every step: the speed of attending to as few tokens with no eviction or gate at
        # all, so the most any bounded cache could gain at this M.
        short_context = context[:, -(decode_memory + decode_buffer // 2):]
        times = {"full": [], "retention": [], "short": []}
        for _ in range(args.repeats):
            # The caches are prefilled, then decoding goes round them token by token (who goes first rotates), so a
            # slow spell of this shared machine hits all alike.
            caches = {"full": DynamicCache(config=model.config),
                      "retention": RetentionCache.for_model(model, decode_memory, decode_buffer,
                                                            decayed_attention=decayed),
                      "short": DynamicCache(config=model.config)}
            for name, cache in caches.items():
                prompt_ids = short_context if name == "short" else context
                chunk = decode_buffer if name == "retention" else prompt_ids.shape[1]
                bounded_generate(model, prompt_ids, torch.ones_like(prompt_ids), cache, chunk_size=chunk,
                                 max_new_tokens=1, do_sample=False)  # prefill
            ids = {name: context[:, -1:] for name in caches}
            elapsed = dict.fromkeys(caches, 0.0)
            names = list(caches)
            with torch.no_grad():
                for step in range(args.decode_tokens):
                    first = step % len(names)
                    for name in names[first:] + names[:first]:
                        start = time.perf_counter()
                        logits = model(input_ids=ids[name], use_cache=True, **with_cache(model, caches[name])).logits
                        ids[name] = logits[:, -1:].argmax(-1)
                        elapsed[name] += time.perf_counter() - start
                    caches["short"].crop(-1)
            for name in times:
                times[name].append(elapsed[name])
        rates = {name: args.decode_tokens / statistics.median(values) for name, values in times.items()}
        speed[str(decode_memory)] = {"context": 8 * decode_memory, "buffer_size": decode_buffer,
                                     "full_tokens_per_s": rates["full"], "retention_tokens_per_s": rates["retention"],
                                     "ratio": rates["retention"] / rates["full"],
                                     "ratio_per_repeat": [f / r for f, r in zip(times["full"], times["retention"])],
                                     "short_tokens": short_context.shape[1],
                                     "short_ratio": rates["short"] / rates["full"]}
    results = {"environment": environment(), "gates": str(gates), "decayed_attention": decayed,
               "memory_size": memory, "buffer_size": buffer, "memory_rows": rows, "decode": speed}
    (out / "inference.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# KV retention: cache memory and decode speed", ""] + environment_lines(results["environment"]) + [
        f"Gates `{gates}`, the cache's attention {'decayed' if decayed else 'plain'}. RetentionCache M={memory}, "
        f"buffer={buffer} vs the full DynamicCache; greedy decoding of random tokens.", "",
        "| tokens in context | full KV bytes | retention KV bytes | ratio | bound (M+buffer)/T |", "|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['full_kv_bytes']} | {r['retention_kv_bytes']} | {r['ratio']:.3f} | "
              f"{min(r['bound'], 1):.3f} |" for r in rows]
    lines += ["", f"Decode speed at a context of 8 x M ({args.decode_tokens} tokens after the prefill; the caches take "
              f"turns token by token, median of {args.repeats} runs; buffer = M / 4). Ceiling: a full cache cut back to "
              f"M + buffer / 2 tokens after every step (attends to as few tokens, no eviction or gate), over the full "
              f"cache: the most any bounded cache could gain at this M.", "",
              "| M | context | full cache (tok/s) | RetentionCache (tok/s) | retention / full | range over runs | ceiling |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {v['context']} | {v['full_tokens_per_s']:.1f} | {v['retention_tokens_per_s']:.1f} | "
              f"{v['ratio']:.2f}x | {min(v['ratio_per_repeat']):.2f}-{max(v['ratio_per_repeat']):.2f}x | "
              f"{v['short_ratio']:.2f}x |" for m, v in speed.items()]
    plt = pyplot()
    figure, (axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    axis.plot([r["tokens"] for r in rows], [r["full_kv_bytes"] for r in rows], marker="o", label="full cache")
    axis.plot([r["tokens"] for r in rows], [r["retention_kv_bytes"] for r in rows], marker="o", label="RetentionCache")
    axis.set_xlabel("tokens in context")
    axis.set_ylabel("KV bytes")
    axis.legend()
    contexts = [v["context"] for v in speed.values()]
    speed_axis.plot(contexts, [v["full_tokens_per_s"] for v in speed.values()], marker="o", label="full cache")
    speed_axis.plot(contexts, [v["retention_tokens_per_s"] for v in speed.values()], marker="o",
                    label="RetentionCache (M = context / 8)")
    speed_axis.plot(contexts, [v["short_ratio"] * v["full_tokens_per_s"] for v in speed.values()], marker="x",
                    linestyle=":", label="ceiling: full cache of M + buffer / 2")
    speed_axis.set_xscale("log", base=2)
    speed_axis.set_xlabel("context (tokens)")
    speed_axis.set_ylabel("decode tokens/s")
    speed_axis.legend()
    finish(out, "inference", lines, figure)


def training(args) -> None:
    import tempfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--model.name_or_path", args.base, "--report_to", "none", "--save_strategy", "no",
              "--resume_from_checkpoint", "false", "--max_steps", str(args.steps), "--per_device_train_batch_size", "16",
              "--max_length", "512",
              "--data.datasets", json.dumps([{"path": str(MQAR_TRAIN), "columns": ["prompt", "completion"]}])]
    times = {}
    for _ in range(args.repeats):  # alternate the two, so drift on a shared machine hits both
        for name in ("lora_sft", "gates", "gates_evict"):
            timer = step_timer()
            with tempfile.TemporaryDirectory() as tmp:
                if name.startswith("gates"):
                    evict = ["--train_with_eviction", str(name == "gates_evict").lower()]
                    run_recipe("recipes/tiny/trim_kv.yaml", common + evict + ["--training.output_dir", tmp], [timer])
                else:
                    run_recipe("recipes/tiny/sstoken.yaml", common + [
                        "--model.from_scratch", "null", "--training.output_dir", tmp, "--token_scorer", "none",
                        "--peft.r", "16", "--peft.lora_alpha", "32", "--peft.target_modules", "all-linear"], [timer])
            times.setdefault(name, []).append(timer.median())
    ratio = min(times["gates"]) / min(times["lora_sft"])
    ratio_evict = min(times["gates_evict"]) / min(times["lora_sft"])
    results = {"environment": environment(), "step_seconds": times, "ratio": ratio, "ratio_evict": ratio_evict}
    (out / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Gate training step time vs LoRA SFT", ""] + environment_lines(results["environment"]) + [
        f"Same base, mqar rows, batch 16; median step of {args.steps} steps, best of {args.repeats} alternating runs.",
        "", "| run | step (s) |", "|---|---|",
        f"| LoRA SFT (r16, all linear) | {min(times['lora_sft']):.4f} |",
        f"| retention gates (teacher + student forward, CE + KL + capacity) | {min(times['gates']):.4f} |",
        f"| retention gates, train_with_eviction (a second attention per layer) | {min(times['gates_evict']):.4f} |",
        "", f"Ratio gates / LoRA SFT: {ratio:.2f}; with eviction: {ratio_evict:.2f}"]
    finish(out, "training", lines)


LENGTH_ARMS = {  # name: (label, gate kernel or None for LoRA SFT, train_with_eviction)
    "lora_sft": ("LoRA SFT (r16, all linear)", None, False),
    "gates_fused": ("gates, fused sdpa (the default)", "fused", False),
    "gates_chunked": ("gates, chunked attention", "chunked", False),
    "gates_dense": ("gates, dense [B, H, T, T] bias", "dense", False),
    "evict_fused": ("gates + eviction, fused sdpa", "fused", True),
    "evict_chunked": ("gates + eviction, chunked attention", "chunked", True),
    "evict_dense": ("gates + eviction, dense bias", "dense", True),
}


def measure_step(arm: str, length: int, steps: int, base: str, memory_size: int, chunk: int,
                 gate_width: int = 512) -> dict:
    """Seconds per training step (forward + backward, median after one warm-up) and the memory the step adds on
    top of the loaded model (CUDA: peak allocated; CPU: peak resident set), for one arm at one sequence length."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokensieve.trainers.guards import GuardedSFTTrainer, SFTBaselineConfig
    from tokensieve.trainers.retention import RetentionConfig, RetentionTrainer

    _, kernel, evict = LENGTH_ARMS[arm]
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if cuda else torch.float32)
    dataset = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    common = {"per_device_train_batch_size": 1, "report_to": "none", "use_cpu": not cuda, "bf16": cuda,
              "activation_checkpointing": False, "save_strategy": "no"}
    with tempfile.TemporaryDirectory() as tmp:
        if kernel is None:
            trainer = GuardedSFTTrainer(model=model, args=SFTBaselineConfig(output_dir=tmp, **common),
                                        train_dataset=dataset, processing_class=tokenizer,
                                        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        else:
            args = RetentionConfig(output_dir=tmp, memory_size=memory_size, train_with_eviction=evict,
                                   training_attention=kernel, training_attention_chunk=chunk,
                                   gate_intermediate_size=gate_width, **common)
            trainer = RetentionTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    device = trainer.args.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tokenizer.vocab_size, (1, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # a prompt half and a completion half
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}
    return training_step_cost(trainer, batch, steps)


def training_lengths(args) -> None:
    """Each (arm, length) in a fresh process, so that one arm's peak memory does not hide another's."""
    import subprocess
    import sys

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "base": args.base, "lengths": args.lengths,
               "memory_size": args.memory_size, "chunk": args.chunk, "gate_width": args.gate_width,
               "arms": {arm: {} for arm in ["lora_sft", *args.arms]}}
    for length in args.lengths:
        for _ in range(args.repeats):  # alternating arms, so drift on a shared machine hits all of them
            for arm in results["arms"]:
                entry = results["arms"][arm].setdefault(str(length), {"seconds": [], "step_bytes": []})
                command = [sys.executable, __file__, "training-lengths", "--one", arm, "--base", args.base,
                           "--lengths", str(length), "--steps", str(args.steps), "--memory-size",
                           str(args.memory_size), "--chunk", str(args.chunk), "--gate-width", str(args.gate_width)]
                # Two processes: one timed with the default allocator; one for memory, where glibc's malloc returns
                # every block over 128 KiB to the system when it is freed (otherwise the resident set keeps freed
                # memory and its peak says more about the allocator than about the step; page faults make it slow).
                for key, env in (("seconds", {}), ("step_bytes", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
                    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
                    if done.returncode != 0:
                        raise SystemExit(f"{arm} at {length} tokens failed:\n{done.stderr[-3000:]}")
                    entry[key].append(json.loads(done.stdout.strip().splitlines()[-1])[key])
                print(f"[training-lengths] {arm} @ {length}: {entry}", flush=True)
    (out / "training_lengths.json").write_text(json.dumps(results, indent=2) + "\n")
    write_lengths_report(out, results)


def write_lengths_report(out: Path, results: dict) -> None:
    lengths = [str(n) for n in results["lengths"]]
    arms = results["arms"]

    def best(arm, length, key):
        return min(arms[arm][length][key])

    lines = ["# Gate-training step vs LoRA SFT step by sequence length", ""] + environment_lines(
        results["environment"]) + [
        f"One row of T tokens (half prompt, half completion), forward + backward (`Trainer.training_step`), median of "
        f"the steps after a warm-up, best of the repeats; memory: what a step adds on top of the loaded model (peak "
        f"allocated on CUDA; on CPU the peak resident set, measured in a separate run with glibc returning freed "
        f"blocks over 128 KiB to the system), each arm in a fresh process. Model {results.get('base')}; M = "
        f"{results['memory_size']}, chunk {results['chunk']} query rows, gate width {results.get('gate_width', 512)}.",
        "",
        "| arm | " + " | ".join(f"T = {n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for arm in arms:
        label, cells = LENGTH_ARMS[arm][0], []
        for n in lengths:
            seconds, memory = best(arm, n, "seconds"), best(arm, n, "step_bytes")
            if arm == "lora_sft":
                cells.append(f"{seconds:.3f} s, {memory / 2**20:.0f} MiB")
            else:
                cells.append(f"{seconds / best('lora_sft', n, 'seconds'):.2f}x time, "
                             f"{memory / max(best('lora_sft', n, 'step_bytes'), 1):.2f}x memory "
                             f"({memory / 2**20:.0f} MiB)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Gate rows: step time and step memory as ratios to the LoRA SFT step at the same length."]
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for arm in arms:
        label = LENGTH_ARMS[arm][0]
        axis.plot([int(n) for n in lengths], [best(arm, n, "step_bytes") / 2**20 for n in lengths], marker="o",
                  label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log", base=2)
    axis.set_xlabel("sequence length T")
    axis.set_ylabel("step memory (MiB)")
    axis.legend(fontsize=7)
    finish(out, "training_lengths", lines, figure)


def _capacity_by_definition(log_beta: torch.Tensor, memory: int, rows: int = 256) -> torch.Tensor:
    """The capacity loss with one exponential per (row, key), blocks of `rows` query rows: the formula the factored
    `capacity_terms` replaces, kept here as the timing and accuracy reference."""
    length = log_beta.shape[-1]
    total, count = log_beta.new_zeros(()), log_beta.new_zeros(())
    for start in range(0, length, rows):
        end = min(start + rows, length)
        age = (torch.arange(start, end)[:, None] - torch.arange(end)[None]).to(log_beta.dtype)
        retained = (torch.exp(age.clamp(min=0) * log_beta[..., None, :end]) * (age >= 0)).sum(-1)
        excess = (retained - memory) / (torch.arange(start, end) - memory).clamp(min=1)
        total, count = total + excess.clamp(min=0).sum(), count + (excess > 0).sum()
    return total / count.clamp(min=1)


def kernels(args) -> None:
    """The gated training attention kernels and the capacity loss on raw tensors shaped like the tiny base's
    attention (forward + backward, best of --repeats), with their error against the dense / definitional reference."""
    from torch.nn import functional as F

    from tokensieve.selectors.attention import (chunked_gated_attention, dense_gated_attention,
                                                fused_gated_attention)
    from tokensieve.selectors.retention import capacity_loss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch, heads, kv_heads, dim, memory = 1, 8, 4, 16, args.memory_size
    scaling = dim**-0.5
    generator = torch.Generator().manual_seed(0)
    arms = {  # name: function of (query, key, value, log_beta) -> a tensor to sum for the backward pass
        "sdpa, causal, no bias": lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   scale=scaling, enable_gqa=True),
        "fused": lambda q, k, v, b: fused_gated_attention(q, k, v, None, b, scaling),
        "chunked": lambda q, k, v, b: chunked_gated_attention(q, k, v, None, b, scaling),
        "dense": lambda q, k, v, b: dense_gated_attention(q, k, v, None, b, scaling),
        "capacity loss, factored": lambda q, k, v, b: capacity_loss(b, memory),
        "capacity loss, by definition": lambda q, k, v, b: _capacity_by_definition(b, memory),
    }
    results = {"environment": environment(), "lengths": args.lengths, "rows": []}
    for length in args.lengths:
        query = torch.randn(batch, heads, length, dim, generator=generator)
        key, value = torch.randn(2, batch, kv_heads, length, dim, generator=generator)
        row = {"length": length, "seconds": {}, "error": {}}
        for depth in (1.0, 10.0):  # log beta down to -1 and to -10
            log_beta = -torch.rand(batch, kv_heads, length, generator=generator) ** 3 * depth
            outputs = {}
            for name, function in arms.items():
                if name == "dense" and length > args.dense_up_to:
                    continue
                tensors = [t.clone().requires_grad_() for t in (query, key, value, log_beta)]
                best = math.inf
                for _ in range(args.repeats):
                    for t in tensors:
                        t.grad = None
                    started = time.perf_counter()
                    result = function(*tensors)
                    (result * result).sum().backward()
                    best = min(best, time.perf_counter() - started)
                if depth == 1.0:
                    row["seconds"][name] = best
                outputs[name] = (result.detach(), tensors[3].grad)
            reference = "dense" if "dense" in outputs else "chunked"
            for name in ("fused", "chunked") if reference == "dense" else ("fused",):
                output, gradient = outputs[name]
                expected, expected_gradient = outputs[reference]
                row["error"][f"{name} vs {reference}, log beta >= -{depth:g}"] = {
                    "output": (output - expected).abs().max().item(),
                    "gradient": ((gradient - expected_gradient).abs().max() / expected_gradient.abs().max()).item()}
            factored, definition = outputs["capacity loss, factored"][0], outputs["capacity loss, by definition"][0]
            row["error"][f"capacity factored vs definition, log beta >= -{depth:g}"] = {
                "output": abs(factored.item() - definition.item()) / max(abs(definition.item()), 1e-12)}
        results["rows"].append(row)
        print(f"[kernels] T = {length}: " + ", ".join(f"{k} {v:.4f} s" for k, v in row["seconds"].items()), flush=True)
    (out / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")
    names = list(arms)
    lines = ["# Gated training attention and capacity loss on raw tensors", ""] + environment_lines(
        results["environment"]) + [
        f"Batch 1, {heads} heads, {kv_heads} kv heads, head dim {dim} (the tiny base's attention); log beta = "
        f"-u^3 (u uniform) for the times; forward + backward, best of {args.repeats}; M = {memory}.", "",
        "| T | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in results["rows"]:
        lines.append(f"| {row['length']} | " + " | ".join(
            f"{row['seconds'][n]:.4f} s" if n in row["seconds"] else "—" for n in names) + " |")
    lines += ["", "Error (max abs output difference; max gradient difference relative to the largest gradient; "
              "capacity: relative difference of the loss):", "", "| T | comparison | output | log-beta gradient |",
              "|---|---|---|---|"]
    for row in results["rows"]:
        for name, error in row["error"].items():
            gradient = f"{error['gradient']:.1e}" if "gradient" in error else "—"
            lines.append(f"| {row['length']} | {name} | {error['output']:.1e} | {gradient} |")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for name in names:
        points = [(row["length"], row["seconds"][name]) for row in results["rows"] if name in row["seconds"]]
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length T")
    axis.set_ylabel("forward + backward (s)")
    axis.legend(fontsize=7)
    finish(out, "kernels", lines, figure)


def slots(args) -> None:
    """Where the cache's slots go at answer time, per layer and kv head, for a gates export and each budget."""
    from tokensieve.launch.export import load_retention_model, read_gates_config
    from tokensieve.selectors.kv_cache import cache_attention
    from tokensieve.trainers.retention_map import plot_retention_map, recall_token_kinds, retention_snapshot, slot_shares

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gates = Path(args.gates) if args.gates else train_gates(args.base, out, args.train_steps)[1]
    model, tokenizer = load_retention_model(gates)
    decayed = cache_attention(read_gates_config(gates), args.attention, "gates")
    results = {"environment": environment(), "gates": str(gates), "decayed_attention": decayed, "tasks": {}}
    lines = ["# Where the RetentionCache's slots go at answer time", ""] + environment_lines(results["environment"]) + [
        f"Gates `{gates}`; M = budget x mean prompt tokens, buffer = M / 4, the prompt prefilled in chunks of the "
        f"buffer, the cache's attention {'decayed' if decayed else 'plain'}. Shares: of the slots each (layer, kv head) holds when the answer is generated, mean over rows. "
        f"Asked survived: the share of rows where that head still holds the asked pair (mqar: the queried key and "
        f"its value; needle-qa: the needle's value).", ""]
    for task in args.tasks:
        if task not in TASKS and not args.data:
            raise SystemExit(f"slots --tasks {task}: a real-prose task needs --data FILE (its rows)")
        rows = read_rows(Path(args.data) if args.data else TASKS[task], args.test_examples)
        labelled = [recall_token_kinds(row, tokenizer) for row in rows]
        names = labelled[0][2]
        context = sum(len(ids) for ids, _, _, _ in labelled) / len(labelled)
        entry = results["tasks"].setdefault(task, {"mean_prompt_tokens": context, "budgets": {}})
        for fraction in args.budgets:
            memory, buffer = budget_sizes(fraction, context)
            shares, survived = [], []
            for index, (ids, kinds, _, asked) in enumerate(labelled):
                snapshot = retention_snapshot(model, ids, memory, buffer, decayed_attention=decayed)
                found = slot_shares(snapshot, kinds, names, asked)
                shares.append(torch.stack([found["shares"][n] for n in names], dim=-1))  # [layers, H, kinds]
                survived.append(found["asked_survived"].float())
                if index == 0:
                    plot_retention_map(snapshot, kinds, out / f"retention_map_{task}_{fraction}.png",
                                       title=f"{task}, row 0, M = {memory}, buffer {buffer}")
            share = torch.stack(shares).mean(0)
            alive = torch.stack(survived).mean(0)
            entry["budgets"][str(fraction)] = {"memory_size": memory, "buffer_size": buffer, "kinds": names,
                                               "shares": share.tolist(), "asked_survived": alive.tolist()}
            by_layer = share.shape[0] > 4  # a real model: one row per layer, the mean over its kv heads
            lines += [f"**{task}, {fraction:.0%} budget** (M = {memory}, buffer {buffer}; mean prompt "
                      f"{context:.0f} tokens; {len(rows)} rows)", "",
                      f"| {'layer (mean of kv heads)' if by_layer else 'layer, kv head'} | " + " | ".join(names)
                      + " | asked survived |", "|---|" + "---|" * (len(names) + 1)]
            for layer in range(share.shape[0]):
                heads = [None] if by_layer else range(share.shape[1])
                for head in heads:
                    values = share[layer].mean(0) if head is None else share[layer, head]
                    kept = alive[layer].mean() if head is None else alive[layer, head]
                    cells = " | ".join(f"{v:.2f}" for v in values.tolist())
                    lines.append(f"| L{layer}{'' if head is None else f' H{head}'} | {cells} | {kept:.2f} |")
            lines.append("")
    (out / "slots.json").write_text(json.dumps(results, indent=2) + "\n")
    finish(out, "slots", lines)


# (task, M, buffer) each robustness cell is scored at: 10% of a 256-word mqar prompt; needle-qa needs a slot per fact,
# and at 48 and 64 + 8 it shows whether a larger cache than the training budget (M = 22) answers at least as well
ROBUSTNESS_EVALS = [("mqar-256", 22, 4), ("mqar", 32, 8), ("needle-qa", 32, 8), ("needle-qa", 48, 8),
                    ("needle-qa", 64, 8)]
ROBUSTNESS_TOLERANCE = 0.02
ROBUSTNESS_KEY = "needle-qa@32"  # the score a cell passes or fails on


def _eval_key(task: str, memory: int) -> str:
    return f"{task}@{memory}"


def robustness_cell(args, learning_rate: str, steps: int, threads: int) -> dict:
    """Train one cell's soft gates with the tiny recipe and score them under each --attention; the scores of an
    earlier run are reused. Returns {attention: {task@M: score}}."""
    import subprocess
    import sys

    out = Path(args.out)
    name = f"lr{learning_rate}_s{steps}_seed{args.seed}"
    export = out / name
    scores = {(attention, _eval_key(task, memory)): out / f"{name}.{task}-{memory}.{attention}.json"
              for attention in args.attention for task, memory, _ in ROBUSTNESS_EVALS}
    cli = [sys.executable, "-m", "tokensieve"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    commands = []
    if not (export / "gates.json").exists():
        commands.append(cli + ["train", str(REPO / "recipes/tiny/trim_kv.yaml"), "--model.name_or_path", args.base,
                               "--training.output_dir", str(export), "--learning_rate", learning_rate,
                               "--max_steps", str(steps), "--seed", str(args.seed), "--report_to", "none",
                               "--save_strategy", "no", "--resume_from_checkpoint", "false",
                               "--retention_map_steps", "0"])
    for attention in args.attention:
        for task, memory, buffer in ROBUSTNESS_EVALS:
            path = scores[attention, _eval_key(task, memory)]
            if not path.exists():
                commands.append(cli + ["eval", str(export), "--data", str(TASKS[task]), "--memory-size", str(memory),
                                       "--buffer-size", str(buffer), "--attention", attention, "--output", str(path)]
                                + (["--max-examples", str(args.test_examples)] if args.test_examples else []))
    if commands:
        start = time.perf_counter()
        with (out / f"{name}.log").open("a") as log:
            for command in commands:
                log.write(" ".join(command) + "\n")
                log.flush()
                if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                    raise SystemExit(f"robustness cell {name} failed: {' '.join(command)} (log: {out / f'{name}.log'})")
        print(f"[robustness] {name}: {time.perf_counter() - start:.0f} s", flush=True)
    found = {attention: {} for attention in args.attention}
    for (attention, key), path in scores.items():
        found[attention][key] = next(iter(json.loads(path.read_text())["results"].values()))["exact_match"]
    return found


def _monotone(scores: dict) -> bool:
    """needle-qa never answers worse with a larger cache (scores are counts / rows: a margin for their rounding)."""
    series = [scores[_eval_key(task, memory)] for task, memory, _ in ROBUSTNESS_EVALS if task == "needle-qa"]
    return all(later >= earlier - 1e-9 for earlier, later in zip(series, series[1:]))


def robustness(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tokensieve.launch.evaluate import evaluate_files

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(lr, steps) for lr in args.learning_rates for steps in args.max_steps]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    with ThreadPoolExecutor(args.workers) as pool:
        found = dict(zip(cells, pool.map(lambda cell: robustness_cell(args, *cell, threads), cells)))
    full_path = out / "full_cache.json"
    tasks = sorted({task for task, _, _ in ROBUSTNESS_EVALS})
    if not full_path.exists():
        evaluate_files(args.base, [str(TASKS[task]) for task in tasks], max_examples=args.test_examples,
                       output=str(full_path))
    full = {task: json.loads(full_path.read_text())["results"][str(TASKS[task])]["exact_match"] for task in tasks}
    best = {attention: max(found[cell][attention][ROBUSTNESS_KEY] for cell in cells) for attention in args.attention}

    def fails(attention, cell):
        return best[attention] - found[cell][attention][ROBUSTNESS_KEY] > ROBUSTNESS_TOLERANCE + 1e-9

    results = {"environment": environment([args.seed]), "evals": ROBUSTNESS_EVALS, "full_cache": full,
               "best_needle_qa": best, "workers": args.workers, "threads_per_cell": threads,
               "cells": [{"learning_rate": lr, "max_steps": steps, "attention": attention,
                          **found[lr, steps][attention], "fails": fails(attention, (lr, steps)),
                          "monotone": _monotone(found[lr, steps][attention])}
                         for lr, steps in cells for attention in args.attention]}
    (out / "robustness.json").write_text(json.dumps(results, indent=2) + "\n")
    settings = ", ".join(f"{task} at {memory} + {buffer}" for task, memory, buffer in ROBUSTNESS_EVALS)
    lines = ["# Soft gate training across learning rates and steps", ""] + environment_lines(results["environment"]) + [
        f"`recipes/tiny/trim_kv.yaml` (soft stage, training budget M = 22) with `--learning_rate LR --max_steps N`, "
        f"seed {args.seed}; each export scored by `tokensieve eval EXPORT --data FILE --memory-size M --buffer-size B "
        f"--attention A` ({settings}; {args.test_examples or 'all'} test rows) with the cache's attention plain (as "
        f"in the paper) or decayed (the training bias on the kept tokens); {args.workers} cells at a time, {threads} "
        f"torch thread(s) each. Full cache: {', '.join(f'{t} {v:.3f}' for t, v in full.items())}. Marked *: "
        f"needle-qa at 32 + 8 more than {ROBUSTNESS_TOLERANCE} below the best cell of that attention; marked v: "
        f"needle-qa falls somewhere from 32 to 48 to 64 + 8.", ""]
    for attention in args.attention:
        passing = sum(not fails(attention, cell) for cell in cells)
        monotone = sum(_monotone(found[cell][attention]) for cell in cells)
        lines += [f"**attention {attention}**: {passing} of {len(cells)} cells within {ROBUSTNESS_TOLERANCE} of the "
                  f"best needle-qa at 32 + 8 ({best[attention]:.3f}); needle-qa non-decreasing from 32 to 64 + 8 in "
                  f"{monotone} of {len(cells)}.", "",
                  "| learning rate, steps | " + " | ".join(f"{t} {m} + {b}" for t, m, b in ROBUSTNESS_EVALS) + " |",
                  "|---|" + "---|" * len(ROBUSTNESS_EVALS)]
        for cell in cells:
            scores = found[cell][attention]
            marks = [f"{scores[_eval_key(t, m)]:.3f}" + (" *" if _eval_key(t, m) == ROBUSTNESS_KEY
                                                          and fails(attention, cell) else "")
                     for t, m, _ in ROBUSTNESS_EVALS]
            flag = "" if _monotone(scores) else " v"
            lines.append(f"| {cell[0]}, {cell[1]}{flag} | " + " | ".join(marks) + " |")
        lines.append("")
    plt = pyplot()
    figure, axes = plt.subplots(1, len(args.attention), figsize=(4.2 * len(args.attention), 3.4), squeeze=False)
    for axis, attention in zip(axes[0], args.attention):
        grid = [[found[lr, n][attention][ROBUSTNESS_KEY] for n in args.max_steps] for lr in args.learning_rates]
        axis.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for row, lr in enumerate(args.learning_rates):
            for column, n in enumerate(args.max_steps):
                scores = found[lr, n][attention]
                series = " / ".join(f"{scores[_eval_key('needle-qa', m)]:.2f}" for t, m, _ in ROBUSTNESS_EVALS
                                    if t == "needle-qa")
                axis.text(column, row, series, ha="center", va="center", fontsize=6,
                          color="white" if grid[row][column] < 0.6 else "black")
        axis.set_xticks(range(len(args.max_steps)), [str(n) for n in args.max_steps])
        axis.set_yticks(range(len(args.learning_rates)), args.learning_rates)
        axis.set_xlabel("max_steps")
        axis.set_ylabel("learning rate")
        axis.set_title(f"needle-qa at 32 / 48 / 64 + 8, attention {attention}", fontsize=8)
    finish(out, "robustness", lines, figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    a = commands.add_parser("accuracy")
    a.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    a.add_argument("--test-examples", type=int, default=None)
    a.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    i = commands.add_parser("inference")
    i.add_argument("--memory-size", type=int, default=32)
    i.add_argument("--decode-tokens", type=int, default=128)
    i.add_argument("--decode-memory-sizes", nargs="+", type=int, default=[32, 128, 512],
                   help="M of each decode-speed comparison, at a context of 8 x M")
    i.add_argument("--repeats", type=int, default=9)
    i.add_argument("--attention", default=None, choices=["plain", "decayed"],
                   help="the RetentionCache's attention (default: the export's)")
    t = commands.add_parser("training")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--repeats", type=int, default=2)
    s_ = commands.add_parser("slots")
    s_.add_argument("--tasks", nargs="+", default=["mqar", "needle-qa"],
                    choices=sorted(TASKS) + ["passkey", "named-keys", "facts"])
    s_.add_argument("--attention", default=None, choices=["plain", "decayed"],
                    help="the cache's attention (default: the export's)")
    s_.add_argument("--data", default=None, help="a JSONL of rows of the (one) task instead of its test split")
    s_.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25])
    s_.add_argument("--test-examples", type=int, default=100)
    k = commands.add_parser("kernels")
    k.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    k.add_argument("--repeats", type=int, default=3)
    k.add_argument("--memory-size", type=int, default=32)
    k.add_argument("--dense-up-to", type=int, default=4096, help="skip the dense reference above this length")
    n = commands.add_parser("training-lengths")
    n.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    n.add_argument("--steps", type=int, default=3)
    n.add_argument("--repeats", type=int, default=2)
    n.add_argument("--memory-size", type=int, default=128)
    n.add_argument("--chunk", type=int, default=128)
    n.add_argument("--gate-width", type=int, default=512, help="gate_intermediate_size of the gate arms (the "
                   "SmolLM2 recipe's is 64)")
    n.add_argument("--arms", nargs="+", default=[arm for arm in LENGTH_ARMS if arm != "lora_sft"],
                   choices=[arm for arm in LENGTH_ARMS if arm != "lora_sft"], help="gate arms beside LoRA SFT")
    n.add_argument("--one", default=None, choices=sorted(LENGTH_ARMS), help=argparse.SUPPRESS)
    r = commands.add_parser("robustness")
    r.add_argument("--learning-rates", nargs="+", default=["2.5e-3", "5e-3", "1e-2"])
    r.add_argument("--max-steps", nargs="+", type=int, default=[1200, 2400, 4800])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=int, default=2, help="cells trained at once (the CPU threads split between them)")
    r.add_argument("--test-examples", type=int, default=None)
    r.add_argument("--attention", nargs="+", default=["plain", "decayed"], choices=["plain", "decayed"],
                   help="how the gates' cache attends to what it kept, each scored on the same exports")
    for sub in (a, i, t, s_, n, k, r):
        sub.add_argument("--base", default=str(REPO / "outputs/base/tiny_recall"))
        sub.add_argument("--gates", default=None, help="a gates export (default: train both stages into --out/gates and --out/gates_evict)")
        sub.add_argument("--train-steps", type=int, default=None, help="gate training steps (default: the recipe's)")
        sub.add_argument("--out", default=str(REPO / "outputs/bench/kv_retention"))
    r.set_defaults(out=str(REPO / "outputs/bench/kv_retention/robustness"))
    args = parser.parse_args()
    if args.command == "training-lengths" and args.one:  # one measurement, in a process of its own
        print(json.dumps(measure_step(args.one, args.lengths[0], args.steps, args.base, args.memory_size, args.chunk,
                                      args.gate_width)))
        return
    {"accuracy": accuracy, "inference": inference, "training": training, "slots": slots,
     "training-lengths": training_lengths, "kernels": kernels, "robustness": robustness}[args.command](args)


if __name__ == "__main__":
    main()
