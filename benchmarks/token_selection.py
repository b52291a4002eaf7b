"""Token selection and weighting on noisy-recall: clean-test exact match, selection against the ground truth, and the
step-time / memory overhead.

    python benchmarks/token_selection.py quality --base outputs/base/tiny_recall [--seeds 0 1 2] [--steps 300]
    python benchmarks/token_selection.py overhead [--steps 30]

quality: every method fine-tunes the tiny recall base (fully) with the tiny recipes in recipes/tiny/ on the noisy
train split of noisy-recall (each answer value a random pool word with p = --unlearnable-share, the next pair's
value with p = --learnable-share, else clean) and is scored by greedy exact match on the clean test split:
    sft          plain next-token prediction on every response token       (recipes/tiny/sstoken.yaml, scorer none)
    random       a random 60% of each response                              (scorer random)
    rho1         top 60% of each batch by excess loss over the clean reference (recipes/tiny/rho1.yaml)
    prior        weights (1 - p_ref), mean 1 per response, clean reference    (recipes/tiny/prior.yaml)
    sstoken      top 60% of each response by 0.5 minmax(REL) + 0.5 attention, history = the base, warm-up 20%
    sstoken-g0   the same, gamma 0 (attention only)
    sstoken-g1   the same, gamma 1 (REL only, no warm-up)
    sstoken-ema  the same as sstoken with an EMA history
    curate       `tokensieve curate` (excess loss of the base over the clean reference, top 60% per response), then
                 the base fine-tuned on the curated token_mask only (scorer column)
The reference of rho1 and prior is the base fine-tuned on a clean train split (both shares 0). The selection table
averages the trainer's ground-truth metrics (truth_*) over each run's logged steps: share of each kind of token
kept (or mean weight) and the AUROC of the score for clean vs each noise kind.

overhead: step time and peak memory of ssToken (history base via disabled LoRA adapters, ema, offline) relative
to plain SFT with the same LoRA model, measured side by side: each variant runs in its own process, variants
alternate, twice, and the median step time of the steady-state steps counts.

Both write a markdown table, a JSON of raw numbers and a PNG into --out (default outputs/bench/token_selection).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, environment, environment_lines, finish, pyplot, run_recipe, step_timer

TRAIN = REPO / "data/tasks/noisy-sft/train.jsonl"  # the overhead's data (the cost does not depend on the noise)
SSTOKEN = "recipes/tiny/sstoken.yaml"
METHODS = {
    "sft": (SSTOKEN, ["--token_scorer", "none"]),
    "random": (SSTOKEN, ["--token_scorer", "random"]),
    "rho1": ("recipes/tiny/rho1.yaml", ["--reference_model", "{reference}"]),
    "prior": ("recipes/tiny/prior.yaml", ["--reference_model", "{reference}"]),
    "sstoken": (SSTOKEN, []),
    "sstoken-g0": (SSTOKEN, ["--gamma", "0"]),
    "sstoken-g1": (SSTOKEN, ["--gamma", "1", "--gamma_warmup_steps", "0"]),
    "sstoken-ema": (SSTOKEN, ["--history_model", "ema"]),
    "curate": (SSTOKEN, ["--token_scorer", "column", "--token_weights_column", "token_mask"]),
}
TRUTH = [("kept clean", "truth_kept_clean"), ("kept unlearnable", "truth_kept_unlearnable"),
         ("kept learnable", "truth_kept_learnable"), ("kept other", "truth_kept_other"),
         ("weight clean", "truth_weight_clean"), ("weight unlearnable", "truth_weight_unlearnable"),
         ("weight learnable", "truth_weight_learnable"),
         ("AUROC clean vs unlearnable", "truth_auroc_clean_vs_unlearnable"),
         ("AUROC clean vs learnable", "truth_auroc_clean_vs_learnable")]


def common_overrides(model: str, out: Path, steps: int, seed: int) -> list[str]:
    return ["--model.from_scratch", "null", "--model.name_or_path", model, "--training.output_dir", str(out),
            "--max_steps", str(steps), "--seed", str(seed), "--report_to", "none", "--save_strategy", "no",
            "--resume_from_checkpoint", "false", "--logging_steps", str(max(steps // 10, 1))]


def data_overrides(train: Path) -> list[str]:
    return ["--data.datasets", json.dumps([{"path": str(train)}]), "--data.eval_datasets", "[]",
            "--eval_strategy", "no"]


def make_base(folder: Path) -> str:
    """A from-scratch base with the tiny recipes' sizes and a tokenizer trained on the noisy-sft texts (overhead)."""
    import torch

    from tokensieve.launch.model import load_model_and_tokenizer
    from tokensieve.launch.recipe import load_recipe
    from tokensieve.launch.run import dataset_texts
    from tokensieve.data.loading import load_splits

    if (folder / "config.json").exists():
        return str(folder)
    recipe = load_recipe(REPO / SSTOKEN)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(recipe.model, dataset_texts(load_splits(recipe.data)["train"]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def exact_match(model_dir: Path, test: Path, max_examples: int | None) -> float:
    from tokensieve.launch.evaluate import evaluate_files

    return evaluate_files(str(model_dir), [str(test)], max_examples=max_examples)[str(test)]["exact_match"]


def truth_means(run_dir: Path) -> dict[str, float]:
    """The run's ground-truth metrics, averaged over its logged training steps."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    means = {}
    for _, key in TRUTH:
        values = [entry[key] for entry in state["log_history"] if key in entry]
        if values:
            means[key] = statistics.mean(values)
    return means


def curated(base: str, reference: Path, train: Path, out: Path) -> Path:
    """`tokensieve curate recipes/tiny/curate.yaml` on the noisy train split: token_mask = the top 60% of each
    response by the base's excess loss over the clean reference (the rows keep their noise_spans)."""
    from tokensieve.launch.curate import run_curation
    from tokensieve.launch.recipe import load_curate_recipe

    output = out / "curated.parquet"
    if not output.exists():
        run_curation(load_curate_recipe(REPO / "recipes/tiny/curate.yaml", [
            "--model.name_or_path", base, "--reference_model", str(reference), "--output", str(output),
            "--data.datasets", json.dumps([{"path": str(train)}])]))
    return output


def quality(args) -> None:
    from tokensieve.data.synthetic import make_task

    if not args.base:
        raise SystemExit("quality needs --base: the tiny recall base (bash recipes/base/tiny_recall.sh, or a "
                         "quickstart's base), which can already do associative recall")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    noisy, clean = out / "noisy-recall", out / "noisy-recall-clean"
    shares = {"unlearnable_share": args.unlearnable_share, "learnable_share": args.learnable_share}
    make_task("noisy-recall", noisy, n=args.train_examples, seed=0, **shares)
    make_task("noisy-recall", clean, n=args.train_examples, seed=101, unlearnable_share=0.0, learnable_share=0.0)
    test = noisy / "test.jsonl"
    reference = out / "reference"
    if not (reference / "config.json").exists():  # the base fine-tuned on clean data: Rho-1's and PRIOR's reference
        run_recipe(SSTOKEN, common_overrides(args.base, reference, args.steps, 0) + data_overrides(
            clean / "train.jsonl") + ["--token_scorer", "none"])
    results = {"environment": environment(args.seeds), "base": args.base, "reference": str(reference),
               "steps": args.steps, "seeds": args.seeds, "shares": shares, "test_examples": args.test_examples,
               "runs": {}}
    previous = out / "quality.json"
    if previous.exists():  # a later call with other --methods adds to the same table (same base, steps, data)
        earlier = json.loads(previous.read_text())
        if all(earlier.get(k) == results[k] for k in ("base", "steps", "shares", "test_examples")):
            results["runs"] = {m: r for m, r in earlier["runs"].items() if m not in args.methods}
    results["base_exact_match"] = exact_match(Path(args.base), test, args.test_examples)
    results["reference_exact_match"] = exact_match(reference, test, args.test_examples)
    for method in args.methods:
        recipe, extra = METHODS[method]
        train = curated(args.base, reference, noisy / "train.jsonl", out) if method == "curate" else noisy / "train.jsonl"
        for seed in args.seeds:
            run_dir = out / "runs" / f"{method}-seed{seed}"
            start = time.time()
            run_recipe(recipe, common_overrides(args.base, run_dir, args.steps, seed) + data_overrides(train)
                       + [x.format(reference=reference) for x in extra])
            seconds = time.time() - start
            score = exact_match(run_dir, test, args.test_examples)
            results["runs"].setdefault(method, []).append(
                {"seed": seed, "exact_match": score, "train_seconds": seconds, "truth": truth_means(run_dir)})
            print(f"[token_selection] {method} seed {seed}: exact match {score:.3f} ({seconds:.0f} s)", flush=True)
            (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    write_quality_report(out, results)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_quality_report(out: Path, results: dict) -> None:
    plt = pyplot()
    shares = results["shares"]
    lines = [
        "# Token selection on noisy-recall: clean-test exact match and selection against the ground truth", "",
        *environment_lines(results["environment"]),
        f"Base: `{results['base']}` (exact match {results['base_exact_match']:.3f}); noise shares: unlearnable "
        f"{shares['unlearnable_share']}, learnable {shares['learnable_share']}; {results['steps']} steps per run; "
        f"seeds {results['seeds']}; {results['test_examples'] or 'all'} test examples; the reference (the base "
        f"fine-tuned on clean data) {results['reference_exact_match']:.3f}.", "",
        "| method | exact match (mean ± std) | per seed |", "|---|---|---|",
    ]
    names, means, stds = [], [], []
    for method, runs in results["runs"].items():
        scores = [r["exact_match"] for r in runs]
        mean, std = mean_std(scores)
        names.append(method), means.append(mean), stds.append(std)
        lines.append(f"| {method} | {mean:.3f} ± {std:.3f} | {', '.join(f'{s:.3f}' for s in scores)} |")
    lines += ["", "Selection against the ground truth (mean over seeds of each run's mean over its logged steps):", "",
              "| method | " + " | ".join(label for label, _ in TRUTH) + " |", "|---" * (len(TRUTH) + 1) + "|"]
    for method, runs in results["runs"].items():
        cells = []
        for _, key in TRUTH:
            values = [r["truth"][key] for r in runs if key in r["truth"]]
            cells.append(f"{statistics.mean(values):.2f}" if values else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
    left.set_ylabel("clean-test exact match")
    left.set_title(f"noisy-recall, {results['steps']} steps, {len(results['seeds'])} seeds")
    left.tick_params(axis="x", rotation=45)
    width = 0.25
    for offset, (kind, color) in enumerate([("clean", "#55a868"), ("unlearnable", "#c44e52"), ("learnable", "#dd8452")]):
        kept = [statistics.mean([r["truth"].get(f"truth_kept_{kind}", float("nan")) for r in results["runs"][m]])
                for m in names]
        right.bar([i + (offset - 1) * width for i in range(len(names))], kept, width, label=kind, color=color)
    right.set_xticks(range(len(names)), names, rotation=45)
    right.set_ylabel("share of tokens kept (weight > 0)")
    right.legend()
    finish(out, "quality", lines, figure)


# --- overhead ---------------------------------------------------------------------------------------------------------

OVERHEAD_VARIANTS = {
    "sft": ["--token_scorer", "none"],
    "sstoken-base": ["--token_scorer", "sstoken", "--history_model", "base"],
    "sstoken-ema": ["--token_scorer", "sstoken", "--history_model", "ema"],
    "sstoken-offline": ["--token_scorer", "sstoken", "--history_model", "offline"],
}


def overhead_worker(args) -> None:
    """One variant in this process: time the steady-state steps, report peak RSS (JSON on stdout's last line)."""
    import resource

    timer = step_timer()
    overrides = common_overrides(args.base, Path(args.out) / "overhead-run", args.steps, 0) + [
        "--peft.r", "16", "--peft.lora_alpha", "32", "--peft.lora_dropout", "0.0", "--peft.target_modules", "all-linear",
        "--data.datasets.0.path", args.data, "--data.eval_datasets", "[]", "--per_device_train_batch_size", "16",
        "--max_length", "256",
    ] + OVERHEAD_VARIANTS[args.variant]
    run_recipe("recipes/tiny/sstoken.yaml", overrides, [timer])
    steady = timer.times[5:]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": args.variant, "median_step_s": statistics.median(steady), "steps": len(steady),
                      "peak_rss_mib": peak_mib}))


def overhead(args) -> None:
    import torch
    from datasets import load_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = args.base or make_base(out / "base")
    # Offline history losses: the base model's own per-token losses, as `tokensieve curate --scorer reference_loss`
    # writes them, stored under the column name the trainer reads.
    data = out / "overhead-data.jsonl"
    if not data.exists():
        from tokensieve.data.curation import CurateConfig, curate
        from tokensieve.launch.model import ModelArguments, load_model_and_tokenizer
        from trl.trainer.utils import add_fused_lm_head

        model, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=base))
        add_fused_lm_head(model)
        rows = load_dataset("json", data_files=str(TRAIN), split="train").select(range(2048))
        scored = out / "overhead-scored.jsonl"
        curate(rows, model.eval(), tokenizer, CurateConfig(output=str(scored), scorer="reference_loss", batch_size=64,
                                                           report_examples=0, max_length=256))
        rows = load_dataset("json", data_files=str(scored), split="train").rename_column("token_scores", "history_loss")
        rows.to_json(str(data), lines=True)
    samples = {name: [] for name in OVERHEAD_VARIANTS}
    for _ in range(args.repeats):
        for variant in OVERHEAD_VARIANTS:
            command = [sys.executable, __file__, "overhead-worker", "--variant", variant, "--base", base,
                       "--data", str(data), "--steps", str(args.steps), "--out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
            result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
            if result.returncode:
                raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
            samples[variant].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"[overhead] {samples[variant][-1]}", flush=True)
    base_time = statistics.median(s["median_step_s"] for s in samples["sft"])
    base_mem = statistics.median(s["peak_rss_mib"] for s in samples["sft"])
    rows = []
    for variant, runs in samples.items():
        step = statistics.median(s["median_step_s"] for s in runs)
        mem = statistics.median(s["peak_rss_mib"] for s in runs)
        rows.append({"variant": variant, "median_step_s": step, "time_ratio": step / base_time,
                     "peak_rss_mib": mem, "memory_ratio": mem / base_mem})
    env = environment()
    lines = ["# ssToken overhead vs plain SFT (same LoRA model, same batches)", "", *environment_lines(env),
             f"Base `{base}` + LoRA r16 on all linear layers; batch 16; {args.steps} steps per run (first 5 dropped); "
             f"{args.repeats} alternating repeats; peak memory = peak resident set size of the process (CPU).", "",
             "| variant | median step (s) | step time / SFT | peak RSS (MiB) | memory / SFT |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_step_s']:.4f} | {r['time_ratio']:.2f}x | {r['peak_rss_mib']:.0f} "
                     f"| {r['memory_ratio']:.2f}x |")
    (out / "overhead.json").write_text(json.dumps({"environment": env, "rows": rows, "samples": samples}, indent=2))
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar([r["variant"] for r in rows], [r["time_ratio"] for r in rows], color="#dd8452")
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_ylabel("step time / plain SFT")
    finish(out, "overhead", lines, figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quality", help="clean-test exact match of each method over seeds")
    q.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    q.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    q.add_argument("--steps", type=int, default=300, help="steps of every run, the reference's too")
    q.add_argument("--train-examples", type=int, default=8000)
    q.add_argument("--unlearnable-share", type=float, default=0.25)
    q.add_argument("--learnable-share", type=float, default=0.35)
    q.add_argument("--test-examples", type=int, default=None, help="first N test examples (default: all 500)")
    o = commands.add_parser("overhead", help="step time and peak memory of ssToken vs SFT")
    o.add_argument("--steps", type=int, default=30)
    o.add_argument("--repeats", type=int, default=2)
    w = commands.add_parser("overhead-worker")
    w.add_argument("--variant", choices=list(OVERHEAD_VARIANTS), required=True)
    w.add_argument("--data", required=True)
    w.add_argument("--steps", type=int, required=True)
    for sub in (q, o, w):
        sub.add_argument("--out", default=str(REPO / "outputs/bench/token_selection"))
        sub.add_argument("--base", default=None, help="a saved base model (overhead's default: a from-scratch one)")
    args = parser.parse_args()
    {"quality": quality, "overhead": overhead, "overhead-worker": overhead_worker}[args.command](args)


if __name__ == "__main__":
    main()
