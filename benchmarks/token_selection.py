"""Token selection and weighting on the grounds with ground truth: clean-test exact match, selection against the
ground truth, and the step-time / memory overhead.

    python benchmarks/token_selection.py quality --base outputs/base/tiny_recall [--task noisy-recall] [--seeds 0 1 2]
    python benchmarks/token_selection.py overhead [--steps 30]
    python benchmarks/token_selection.py quality --task mapped-passkey --base models/SmolLM2-135M-Instruct \
        --recipe recipes/smollm2/token_selection.yaml --steps 150 --train-examples 1000 --prompt-tokens 128
    python benchmarks/token_selection.py overhead --base models/SmolLM2-135M-Instruct --recipe \
        recipes/smollm2/token_selection.yaml --train FILE --batch-size 4 --max-length 192 --steps 12

quality: every method fine-tunes the tiny recall base (fully) with the tiny recipes in recipes/tiny/ on the noisy
train split of --task and is scored by greedy exact match on its clean test split. The two grounds:
    noisy-recall    the base already does the clean task (associative recall); the noise is in the answers
    mapped-recall   the base cannot do it (the answer is the recalled value's partner under a fixed mapping):
                    fine-tuning must teach it; the same noise, plus boilerplate the base already predicts
In both, each training answer is a random pool word with p = --unlearnable-share (unlearnable), the asked key echoed
with p = --learnable-share (learnable and wrong), else clean. The methods:
    sft          plain next-token prediction on every response token       (recipes/tiny/sstoken.yaml, scorer none)
    random       a random 60% of each response                              (scorer random)
    rho1         top 60% of each batch by excess loss over the clean reference (recipes/tiny/rho1.yaml)
    rho1-small   the same with a reference fine-tuned on a small clean subset (--small-reference-examples rows,
                 as Rho-1 trains its reference on a small high-quality set)
    prior        weights (1 - p_ref), mean 1 per response, clean reference    (recipes/tiny/prior.yaml)
    sstoken      top 60% of each response by 0.5 minmax(REL) + 0.5 attention, history = the base, warm-up 20%
    sstoken-g0   the same, gamma 0 (attention only)
    sstoken-g1   the same, gamma 1 (REL only, no warm-up)
    sstoken-ema  the same as sstoken with an EMA history
    sstoken-offline  the same as sstoken with the base's losses precomputed (`tokensieve curate --scorer
                 reference_loss`), as the authors' released code does: the same scores as history = the base
    curate       `tokensieve curate` (excess loss of the base over the clean reference, top 60% per response), then
                 the base fine-tuned on the curated token_mask only (scorer column)
The reference of rho1, prior and curate is the base fine-tuned on a clean train split (both shares 0, --train-examples
rows, the same steps). The selection table
averages the trainer's ground-truth metrics (truth_*) over each run's logged steps: share of each kind of token
kept (or mean weight) and the AUROC of the score for clean vs each noise kind. Results go to --out/<task>/quality.json
after each run; a later call with the same settings replaces the (method, seed) pairs it runs and keeps the others,
and with --resume it runs only the pairs not finished yet (e.g. after an interrupted call).

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
    "rho1": ("recipes/tiny/rho1.yaml", ["--token_scorer", "rho1", "--reference_model", "{reference}"]),
    "rho1-small": ("recipes/tiny/rho1.yaml", ["--token_scorer", "rho1", "--reference_model", "{small_reference}"]),
    "prior": ("recipes/tiny/prior.yaml", ["--token_scorer", "prior", "--reference_model", "{reference}",
                                          "--reference_prompt_column", "null"]),
    "sstoken": (SSTOKEN, []),
    "sstoken-g0": (SSTOKEN, ["--gamma", "0"]),
    "sstoken-g1": (SSTOKEN, ["--gamma", "1", "--gamma_warmup_steps", "0"]),
    "sstoken-ema": (SSTOKEN, ["--history_model", "ema"]),
    "sstoken-offline": (SSTOKEN, ["--history_model", "offline"]),
    "curate": (SSTOKEN, ["--token_scorer", "column", "--token_weights_column", "token_mask"]),
}
TASKS = ("noisy-recall", "mapped-recall", "mapped-passkey")  # the last in real prose: --base a real model
NOISE = ("unlearnable", "learnable", "boilerplate")  # noisy-recall has no boilerplate: its columns stay empty
TRUTH = ([("kept clean", "truth_kept_clean")] + [(f"kept {kind}", f"truth_kept_{kind}") for kind in NOISE]
         + [("kept other", "truth_kept_other"), ("weight clean", "truth_weight_clean")]
         + [(f"weight {kind}", f"truth_weight_{kind}") for kind in NOISE]
         + [(f"AUROC clean vs {kind}", f"truth_auroc_clean_vs_{kind}") for kind in NOISE])


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


def with_history_losses(base: str, train: Path, output: Path, rows: int | None = None, max_length: int = 256,
                        batch_size: int = 64) -> Path:
    """`train` (its first `rows` rows) with a `history_loss` column: the base model's own per-token losses, as
    `tokensieve curate --scorer reference_loss` writes them, under the name ssToken's offline history reads."""
    if output.exists():
        return output
    from datasets import load_dataset
    from tokensieve.data.curation import CurateConfig, curate
    from tokensieve.launch.model import ModelArguments, load_model_and_tokenizer
    from trl.trainer.utils import add_fused_lm_head

    model, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=base))
    add_fused_lm_head(model)
    data = load_dataset("json", data_files=str(train), split="train")
    scored = output.with_name(output.stem + "-scored.jsonl")
    curate(data.select(range(rows)) if rows else data, model.eval(), tokenizer, CurateConfig(
        output=str(scored), scorer="reference_loss", batch_size=batch_size, report_examples=0, max_length=max_length))
    load_dataset("json", data_files=str(scored), split="train").rename_column(
        "token_scores", "history_loss").to_json(str(output), lines=True)
    return output


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


def train_reference(recipe: str, base: str, folder: Path, train: Path, steps: int) -> Path:
    """The base fine-tuned on clean rows (plain SFT, seed 0): a reference of Rho-1, PRIOR and curation."""
    if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        run_recipe(recipe, common_overrides(base, folder, steps, 0) + data_overrides(train) + ["--token_scorer", "none"])
    return folder


def quality(args) -> None:
    from tokensieve.data.synthetic import make_task

    if not args.base:
        raise SystemExit("quality needs --base: the tiny recall base (bash recipes/base/tiny_recall.sh, or a "
                         "quickstart's base), which can already do associative recall")
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    noisy, clean = out / "noisy", out / "clean"
    shares = {"unlearnable_share": args.unlearnable_share, "learnable_share": args.learnable_share}
    real = {"tokenizer": args.base, "prompt_tokens": args.prompt_tokens} if args.task == "mapped-passkey" else {}
    make_task(args.task, noisy, n=args.train_examples, seed=0, **shares, **real)
    make_task(args.task, clean, n=args.train_examples, seed=101, unlearnable_share=0.0, learnable_share=0.0, **real)
    test = noisy / "test.jsonl"
    reference = train_reference(args.recipe or SSTOKEN, args.base, out / "reference", clean / "train.jsonl", args.steps)
    small_reference = None
    if "rho1-small" in args.methods:  # Rho-1's own setting: a reference trained on a small clean subset
        small = clean / f"train-first{args.small_reference_examples}.jsonl"
        if not small.exists():
            lines = (clean / "train.jsonl").read_text().splitlines(keepends=True)
            small.write_text("".join(lines[:args.small_reference_examples]))
        small_reference = train_reference(args.recipe or SSTOKEN, args.base, out / f"reference-{args.small_reference_examples}",
                                          small, args.steps)
    results = {"environment": environment(args.seeds), "task": args.task, "base": args.base,
               "recipe": args.recipe or "recipes/tiny/", "reference": str(reference), "steps": args.steps,
               "seeds": args.seeds, "shares": shares,
               "test_examples": args.test_examples, "small_reference_examples": args.small_reference_examples,
               "runs": {}}
    previous = out / "quality.json"
    if previous.exists():  # a later call with other --methods adds to the same table (same base, steps, data)
        earlier = json.loads(previous.read_text())
        if all(earlier.get(k) == results[k] for k in ("task", "base", "recipe", "steps", "shares", "test_examples")):
            # keep every (method, seed) this call does not run again; with --resume, also the ones it would rerun
            rerun = {(m, seed) for m in args.methods for seed in args.seeds}
            results["runs"] = {m: [r for r in runs if args.resume or (m, r["seed"]) not in rerun]
                               for m, runs in earlier["runs"].items()}
            results["runs"] = {m: runs for m, runs in results["runs"].items() if runs}
            results["seeds"] = sorted({r["seed"] for runs in results["runs"].values() for r in runs} | set(args.seeds))
            for key in ("small_reference_exact_match", "small_reference_examples"):
                if "rho1-small" not in args.methods and key in earlier:
                    results[key] = earlier[key]
    results["base_exact_match"] = exact_match(Path(args.base), test, args.test_examples)
    results["reference_exact_match"] = exact_match(reference, test, args.test_examples)
    if small_reference is not None:
        results["small_reference_exact_match"] = exact_match(small_reference, test, args.test_examples)
    for method in args.methods:
        recipe, extra = METHODS[method]
        train = noisy / "train.jsonl"
        if method == "curate":
            train = curated(args.base, reference, train, out)
        elif method == "sstoken-offline":
            train = with_history_losses(args.base, train, out / "noisy-history.jsonl")
        for seed in args.seeds:
            if any(r["seed"] == seed for r in results["runs"].get(method, [])):
                print(f"[token_selection] {args.task} {method} seed {seed}: kept from {previous} (--resume)", flush=True)
                continue
            run_dir = out / "runs" / f"{method}-seed{seed}"
            start = time.time()
            run_recipe(args.recipe or recipe, common_overrides(args.base, run_dir, args.steps, seed) + data_overrides(train)
                       + [x.format(reference=reference, small_reference=small_reference) for x in extra])
            seconds = time.time() - start
            score = exact_match(run_dir, test, args.test_examples)
            results["runs"].setdefault(method, []).append(
                {"seed": seed, "exact_match": score, "train_seconds": seconds, "truth": truth_means(run_dir)})
            results["runs"][method].sort(key=lambda r: r["seed"])
            print(f"[token_selection] {args.task} {method} seed {seed}: exact match {score:.3f} ({seconds:.0f} s)",
                  flush=True)
            (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    write_quality_report(out, results)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_quality_report(out: Path, results: dict) -> None:
    plt = pyplot()
    shares = results["shares"]
    lines = [
        f"# Token selection on {results['task']}: clean-test exact match and selection against the ground truth", "",
        *environment_lines(results["environment"]),
        f"Base: `{results['base']}` (exact match {results['base_exact_match']:.3f}); noise shares: unlearnable "
        f"{shares['unlearnable_share']}, learnable {shares['learnable_share']}; {results['steps']} steps per run; "
        f"seeds {results['seeds']}; {results['test_examples'] or 'all'} test examples; the reference (the base "
        f"fine-tuned on clean data) {results['reference_exact_match']:.3f}"
        + (f"; the small reference ({results['small_reference_examples']} clean rows) "
           f"{results['small_reference_exact_match']:.3f}" if "small_reference_exact_match" in results else "")
        + ".", "",
        "| method | exact match (mean ± std) | per seed |", "|---|---|---|",
    ]
    names, means, stds = [], [], []
    for method, runs in results["runs"].items():
        scores = [r["exact_match"] for r in runs]
        mean, std = mean_std(scores)
        names.append(method), means.append(mean), stds.append(std)
        lines.append(f"| {method} | {mean:.3f} ± {std:.3f} | {', '.join(f'{s:.3f}' for s in scores)} |")
    columns = [(label, key) for label, key in TRUTH  # the kinds this task has
               if any(key in r["truth"] for runs in results["runs"].values() for r in runs)]
    lines += ["", "Selection against the ground truth (mean over seeds of each run's mean over its logged steps):", "",
              "| method | " + " | ".join(label for label, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, runs in results["runs"].items():
        cells = []
        for _, key in columns:
            values = [r["truth"][key] for r in runs if key in r["truth"]]
            cells.append(f"{statistics.mean(values):.2f}" if values else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
    left.set_ylabel("clean-test exact match")
    left.set_title(f"{results['task']}, {results['steps']} steps, {len(results['seeds'])} seeds")
    left.tick_params(axis="x", rotation=45)
    kinds = [(kind, color) for kind, color in [("clean", "#55a868"), ("unlearnable", "#c44e52"),
                                               ("learnable", "#dd8452"), ("boilerplate", "#8172b2")]
             if any(f"truth_kept_{kind}" in r["truth"] for runs in results["runs"].values() for r in runs)]
    width = 0.8 / len(kinds)
    for offset, (kind, color) in enumerate(kinds):
        kept = [statistics.mean([r["truth"].get(f"truth_kept_{kind}", float("nan")) for r in results["runs"][m]])
                for m in names]
        right.bar([i + (offset - (len(kinds) - 1) / 2) * width for i in range(len(names))], kept, width, label=kind,
                  color=color)
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
    # the history pass over every layer, as before it could start at the first adapted layer (the same scores)
    "sstoken-base-full": ["--token_scorer", "sstoken", "--history_model", "base",
                          "--history_from_first_adapted_layer", "false"],
    "sstoken-ema-full": ["--token_scorer", "sstoken", "--history_model", "ema",
                         "--history_from_first_adapted_layer", "false"],
}


def overhead_worker(args) -> None:
    """One variant in this process: time the steady-state steps, report peak RSS (JSON on stdout's last line)."""
    import resource

    timer = step_timer()
    lora = [] if args.recipe else [  # a given recipe brings its own LoRA; the tiny recipe fine-tunes every weight
        "--peft.r", "16", "--peft.lora_alpha", "32", "--peft.lora_dropout", "0.0", "--peft.target_modules", "all-linear"]
    overrides = common_overrides(args.base, Path(args.out) / "overhead-run", args.steps, 0) + lora + [
        "--data.datasets.0.path", args.data, "--data.eval_datasets", "[]", "--per_device_train_batch_size",
        str(args.batch_size), "--max_length", str(args.max_length),
    ] + OVERHEAD_VARIANTS[args.variant]
    run_recipe(args.recipe or SSTOKEN, overrides, [timer])
    steady = timer.times[5:]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": args.variant, "median_step_s": statistics.median(steady), "steps": len(steady),
                      "peak_rss_mib": peak_mib}))


def overhead(args) -> None:
    import torch
    from datasets import load_dataset

    out = Path(args.out).resolve()  # the workers run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    base = args.base or make_base(out / "base")
    # Offline history losses: the base model's own per-token losses, as `tokensieve curate --scorer reference_loss`
    # writes them, stored under the column name the trainer reads.
    data = with_history_losses(base, Path(args.train), out / "overhead-data.jsonl", rows=args.batch_size * (args.steps + 2),
                               max_length=args.max_length, batch_size=8)
    samples = {name: [] for name in ["sft"] + [v for v in args.variants if v != "sft"]}
    for _ in range(args.repeats):
        for variant in samples:
            command = [sys.executable, __file__, "overhead-worker", "--variant", variant, "--base", base,
                       "--data", str(data), "--steps", str(args.steps), "--out", str(out), "--batch-size",
                       str(args.batch_size), "--max-length", str(args.max_length)] + (
                           ["--recipe", args.recipe] if args.recipe else [])
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
             f"Base `{base}` + LoRA ({args.recipe or 'r16 on all linear layers'}); rows of `{args.train}`, batch {args.batch_size}, at most "
             f"{args.max_length} tokens; {args.steps} steps per run (first 5 dropped); "
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
    q.add_argument("--task", default="noisy-recall", choices=TASKS)
    q.add_argument("--recipe", default=None,
                   help="one recipe for every method, by overrides (default: the tiny recipes, recipes/tiny/)")
    q.add_argument("--prompt-tokens", type=int, default=256, help="mapped-passkey: prompt length in tokens")
    q.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    q.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    q.add_argument("--resume", action="store_true",
                   help="keep the runs an earlier call with the same settings finished (in --out's quality.json) "
                        "and run only the missing (method, seed) pairs; without it, every listed pair runs again")
    q.add_argument("--steps", type=int, default=300, help="steps of every run, the reference's too")
    q.add_argument("--train-examples", type=int, default=8000)
    q.add_argument("--unlearnable-share", type=float, default=0.25)
    q.add_argument("--learnable-share", type=float, default=0.35)
    q.add_argument("--test-examples", type=int, default=None, help="first N test examples (default: all 500)")
    q.add_argument("--small-reference-examples", type=int, default=400,
                   help="clean rows of rho1-small's reference (the first N of the clean train split)")
    o = commands.add_parser("overhead", help="step time and peak memory of ssToken vs SFT")
    o.add_argument("--steps", type=int, default=30)
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--variants", nargs="+", default=list(OVERHEAD_VARIANTS), choices=list(OVERHEAD_VARIANTS),
                   help="what to time against plain SFT (always timed)")
    o.add_argument("--train", default=str(TRAIN), help="prompt/completion rows (default: noisy-sft's train split)")
    w = commands.add_parser("overhead-worker")
    w.add_argument("--variant", choices=list(OVERHEAD_VARIANTS), required=True)
    w.add_argument("--data", required=True)
    w.add_argument("--steps", type=int, required=True)
    for sub in (o, w):
        sub.add_argument("--recipe", default=None, help=f"the recipe every variant runs (default {SSTOKEN})")
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--max-length", type=int, default=256)
    for sub in (q, o, w):
        sub.add_argument("--out", default=str(REPO / "outputs/bench/token_selection"))
        sub.add_argument("--base", default=None, help="a saved base model (overhead's default: a from-scratch one)")
    args = parser.parse_args()
    if args.base and Path(args.base).exists():  # a local folder: recorded (e.g. as LoRA exports' base) absolute
        args.base = str(Path(args.base).resolve())
    {"quality": quality, "overhead": overhead, "overhead-worker": overhead_worker}[args.command](args)


if __name__ == "__main__":
    main()
