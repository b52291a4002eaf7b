"""Query-aware context selection on needle-qa: accuracy vs kept share, and prefill cost, for a trained selector and
training-free baselines, all through the same SelectorPipeline.

    python benchmarks/query_selection.py accuracy [--base outputs/base/tiny_recall] [--ratios 0.05 0.1 0.25]
    python benchmarks/query_selection.py prefill  [--ratio 0.1]

accuracy: two selectors are trained on the frozen base with recipes/tiny/query_selector.yaml (learned budget, and
fixed 10% budget) unless --learned/--fixed name exports; then every method answers the needle-qa test split:
full context; the learned-budget selector at its own budget and at each fixed share; the fixed-budget selector at
each share; PromptDistill (the full prompt through its selection layer, then the kept tokens' hidden states) and
GemFilter (the same scores, then the whole LM re-run on the kept tokens from position 0); qk-top (the same scores,
the kept tokens read at their original positions, as the selector's are); first-n, last-n, random-n.
--lora adds a third selector, trained by recipes/tiny/query_selector_lora.yaml (fixed 10% budget, LoRA adapters so
the LM learns to read a context with gaps, attention distillation); the LM with those adapters merged then answers
with full context, with that selector, and with every baseline (rows marked "LoRA LM").
prefill: wall time and KV-cache bytes of the prefill (selection included) of the selector, PromptDistill and GemFilter
at --ratio vs the full context, alternating, best of --repeats.
Each writes a markdown table, raw JSON and a PNG into --out (default outputs/bench/query_selection).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from common import REPO, environment, environment_lines, finish, pyplot, run_recipe

TEST = REPO / "data/tasks/needle-qa/test.jsonl"
BASELINES = ["promptdistill", "gemfilter", "qk-top", "first", "last", "random"]
RECIPE_STEPS = 300  # max_steps of recipes/tiny/query_selector.yaml


def train(base: str, folder: Path, steps: int | None, extra: list[str],
          recipe: str = "recipes/tiny/query_selector.yaml") -> Path:
    if not (folder / "selector.json").exists():
        overrides = ["--model.name_or_path", base, "--training.output_dir", str(folder), "--report_to", "none",
                     "--save_strategy", "no", "--resume_from_checkpoint", "false"] + extra
        if steps:
            overrides += ["--max_steps", str(steps)]
        run_recipe(recipe, overrides)
    return folder


def trained_seed(export: Path) -> int | None:
    """The training seed of a selector export, from the recipe.yaml training wrote next to it (None if absent)."""
    recipe = export / "recipe.yaml"
    if not recipe.is_file():
        return None
    return (yaml.safe_load(recipe.read_text()).get("training") or {}).get("seed", 42)  # 42: transformers' default


def load_rows(n: int | None, separator: str) -> tuple[list[str], list[str], list[str]]:
    from tokensieve.trainers.selector_lm import split_prompt

    rows = [json.loads(line) for line in TEST.open()]
    rows = rows[:n] if n else rows
    pairs = [split_prompt(r["prompt"], separator) for r in rows]
    return [p[0] for p in pairs], [p[1] for p in pairs], [r["completion"] for r in rows]


def accuracy(args) -> None:
    from tokensieve.launch.evaluate import selector_exact_match
    from tokensieve.launch.export import load_selector_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    learned = Path(args.learned) if args.learned else train(args.base, out / "selector-learned", args.train_steps, [])
    # The fixed-budget selector starts at 50% and anneals to 10% (by default over the first half of its steps).
    anneal_steps = args.anneal_steps if args.anneal_steps is not None else (args.train_steps or RECIPE_STEPS) // 2
    anneal = ["--fixed_keep_ratio", "0.1", "--keep_ratio_start", "0.5", "--keep_ratio_anneal_steps", str(anneal_steps)]
    fixed = Path(args.fixed) if args.fixed else train(args.base, out / "selector-fixed", args.train_steps, anneal)
    pipe_learned, pipe_fixed = load_selector_pipeline(learned), load_selector_pipeline(fixed)
    pipe_lora = None
    if args.lora:
        extra = ["--keep_ratio_anneal_steps", str(args.anneal_steps)] if args.anneal_steps is not None else []
        lora = Path(args.lora_selector) if args.lora_selector else train(
            args.base, out / "selector-lora", args.train_steps, extra, "recipes/tiny/query_selector_lora.yaml")
        pipe_lora = load_selector_pipeline(lora)
    rows = [json.loads(line) for line in TEST.open()][: args.test_examples]
    prompts, answers = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    seeds = {trained_seed(folder) for folder in (learned, fixed, lora if args.lora else None) if folder is not None}
    results = {"environment": environment(sorted(seeds - {None}) or (0,)), "base": args.base, "learned": str(learned),
               "fixed": str(fixed), "lora": str(lora) if args.lora else None,
               "ratios": args.ratios, "examples": len(rows), "rows": {},
               "selection_layers": {m: pipe_learned.layer_for(m) for m in ("promptdistill", "gemfilter")}}

    def record(name, column, pipeline, **select):
        score, share = selector_exact_match(pipeline, prompts, answers, desc=f"{name} @ {column}", **select)
        results["rows"].setdefault(name, {})[str(column)] = {"exact_match": score, "kept_share": share}
        print(f"[query_selection] {name} @ {column}: exact match {score:.3f}, kept {share:.3f}", flush=True)

    record("full context", "all", pipe_learned, method="full")
    record("selector (learned budget)", "learned", pipe_learned)
    for ratio in args.ratios:
        record("selector (learned budget)", ratio, pipe_learned, ratio=ratio)
        record("selector (trained at 10%)", ratio, pipe_fixed, ratio=ratio)
        for method in BASELINES:
            record(method, ratio, pipe_learned, method=method, ratio=ratio)
    if pipe_lora is not None:
        record("full context (LoRA LM)", "all", pipe_lora, method="full")
        for ratio in args.ratios:
            record("selector (trained at 10% with LoRA) (LoRA LM)", ratio, pipe_lora, ratio=ratio)
            for method in BASELINES:
                record(f"{method} (LoRA LM)", ratio, pipe_lora, method=method, ratio=ratio)
    (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    write_accuracy_report(out, results)


def write_accuracy_report(out: Path, results: dict) -> None:
    rows, ratios = results["rows"], [str(r) for r in results["ratios"]]
    full = rows["full context"]["all"]["exact_match"]
    own = rows["selector (learned budget)"]["learned"]
    lines = ["# Query-aware selection on needle-qa: exact match vs kept share of the context", ""] + environment_lines(
        results["environment"]) + [
        f"Base `{results['base']}` (frozen); {results['examples']} test examples. Full context: {full:.3f}. "
        f"Learned budget on its own: {own['exact_match']:.3f} keeping {own['kept_share']:.1%} of the context."
        + (f" Full context on the LoRA LM: {rows['full context (LoRA LM)']['all']['exact_match']:.3f}."
           if "full context (LoRA LM)" in rows else "")
        + " Selection layers: " + ", ".join(f"{m} {layer}" for m, layer in results["selection_layers"].items())
        + ".", "",
        "| method | " + " | ".join(f"{float(r):.0%} kept" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for name, entry in rows.items():
        if name.startswith("full context"):
            continue
        values = [entry[r]["exact_match"] for r in ratios]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        axis.plot([float(r) for r in ratios], values, marker="o", label=name)
    axis.axhline(full, color="black", linestyle="--", linewidth=0.8, label="full context")
    axis.set_xlabel("kept share of the context")
    axis.set_ylabel("exact match")
    axis.legend(fontsize=7)
    finish(out, "accuracy", lines, figure)


PREFILL_METHODS = ["full", "selector", "promptdistill", "gemfilter"]


@torch.no_grad()
def prefill(args) -> None:
    from tokensieve.launch.export import load_selector_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    learned = Path(args.learned) if args.learned else train(args.base, out / "selector-learned", args.train_steps, [])
    pipe = load_selector_pipeline(learned)
    contexts, queries, _ = load_rows(args.batch_size, pipe.query_separator)
    batch = pipe.encode(contexts, queries)
    timings, kv_bytes = {method: [] for method in PREFILL_METHODS}, {}
    for _ in range(args.repeats):  # alternating, so drift on a shared machine hits every method alike
        for method in PREFILL_METHODS:
            start = time.perf_counter()
            state = pipe.prefill(batch, method, ratio=None if method == "full" else args.ratio)
            timings[method].append(time.perf_counter() - start)
            kv_bytes[method] = state.kv_bytes()
    best = {m: min(t) for m, t in timings.items()}
    layers = {m: pipe.layer_for(m) for m in ("promptdistill", "gemfilter")}
    results = {"environment": environment(), "ratio": args.ratio, "batch_size": len(contexts),
               "feature_layer": pipe.feature_layer, "selection_layers": layers, "seconds": timings,
               "kv_bytes": kv_bytes, "time_ratio": {m: best[m] / best["full"] for m in PREFILL_METHODS},
               "kv_ratio": {m: kv_bytes[m] / kv_bytes["full"] for m in PREFILL_METHODS}}
    (out / "prefill.json").write_text(json.dumps(results, indent=2) + "\n")
    depth = len(pipe.model.get_decoder().layers)
    lines = ["# Prefill with a kept share of the context vs the full context", ""] + environment_lines(
        results["environment"]) + [
        f"Batch of {len(contexts)} needle-qa prompts, {args.ratio:.0%} of the context kept; a {depth}-layer LM. "
        f"Each time includes the selection: the selector's feature pass through the first {pipe.feature_layer} "
        f"layer(s) over the full prompt; PromptDistill's full prompt through layers 0..{layers['promptdistill']} "
        f"(selecting at layer {layers['promptdistill']}), then the kept tokens through the rest; GemFilter's pass "
        f"to layer {layers['gemfilter']}'s attention, then the whole LM on the kept tokens. Best of {args.repeats} "
        f"alternating runs.", "",
        "| method | prefill (s) | / full | KV-cache bytes after prefill | / full |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {best[m]:.4f} | {results['time_ratio'][m]:.2f} | {kv_bytes[m]:,} | "
              f"{results['kv_ratio'][m]:.2f} |" for m in PREFILL_METHODS]
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(8, 3))
    colours = ["#999999", "#4c72b0", "#dd8452", "#55a868"]
    axes[0].bar(PREFILL_METHODS, [best[m] for m in PREFILL_METHODS], color=colours)
    axes[0].set_ylabel("prefill seconds")
    axes[1].bar(PREFILL_METHODS, [kv_bytes[m] / 2**20 for m in PREFILL_METHODS], color=colours)
    axes[1].set_ylabel("KV cache (MiB)")
    finish(out, "prefill", lines, figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    a = commands.add_parser("accuracy")
    a.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.1, 0.25])
    a.add_argument("--test-examples", type=int, default=None)
    a.add_argument("--lora", action="store_true", help="also a fixed-budget selector trained with LoRA adapters, "
                   "and every method on the LM with those adapters")
    a.add_argument("--lora-selector", default=None, help="with --lora: a selector + LoRA export to use (e.g. "
                   "recipes/tiny/query_selector_lora.yaml trained with another --seed) instead of training one")
    a.add_argument("--fixed", default=None, help="a selector export trained at a fixed budget")
    a.add_argument("--anneal-steps", type=int, default=None, help="steps over which the fixed-budget selector's "
                   "share goes from 50%% to 10%% (default: half its steps)")
    p = commands.add_parser("prefill")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    for sub in (a, p):
        sub.add_argument("--base", default=str(REPO / "outputs/base/tiny_recall"))
        sub.add_argument("--learned", default=None, help="a selector export with the learned budget")
        sub.add_argument("--train-steps", type=int, default=None)
        sub.add_argument("--out", default=str(REPO / "outputs/bench/query_selection"))
    args = parser.parse_args()
    {"accuracy": accuracy, "prefill": prefill}[args.command](args)


if __name__ == "__main__":
    main()
