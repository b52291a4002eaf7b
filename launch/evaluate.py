"""Exact-match evaluation: greedy generation on prompt/completion test files, compared with the completions.

`tokensieve eval MODEL --data FILE [--data FILE ...]` prints one row per file and can write the numbers as
JSON. A prediction is correct when the first tokens generated equal the completion's tokens: generation is
cut at the answer's length, so a model trained to go on after the answer (the multi-question training rows
of mqar and needle-qa) is judged on the answer alone; EOS is not required. Prompts are left-padded and
generated in batches.

Exports evaluate the way they run: a retention-gate export (gates.json) or `--memory-size M` generates from a
bounded RetentionCache (`--policy` gates or a heuristic); `--selector` loads a query-selector export, splits each
prompt at its query separator, keeps the context tokens the selector picks and answers from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokensieve.data.loading import DataArguments, load_splits
from tokensieve.errors import ModelError
from tokensieve.launch.model import ModelArguments, load_model_and_tokenizer


@torch.no_grad()
def exact_match(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 64,
                max_new_tokens: int | None = None, desc: str = "generate", make_cache=None) -> tuple[float, list[str]]:
    """Share of prompts whose greedy continuation starts with the answer's tokens; also the predictions.

    Each prediction is the generated text cut at the answer's token count (or at `max_new_tokens`).
    `make_cache`: a function returning a fresh RetentionCache per batch for bounded-memory generation (the prompt
    is then prefilled in chunks, see `tokensieve.launch.generate.bounded_generate`).
    """
    tokenizer.padding_side = "left"
    predictions, correct = [], 0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        batch_prompts = prompts[start : start + batch_size]
        answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers[start : start + batch_size]]
        budget = max_new_tokens or max(len(ids) for ids in answer_ids)
        inputs = tokenizer(batch_prompts, return_tensors="pt", padding=True).to(model.device)
        options = dict(max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
        if make_cache is None:
            output = model.generate(**inputs, **options)
        else:
            from tokensieve.launch.generate import bounded_generate

            output = bounded_generate(model, inputs["input_ids"], inputs["attention_mask"], make_cache(), **options)
        for generated, ids in zip(output[:, inputs["input_ids"].shape[1] :].tolist(), answer_ids):
            correct += generated[: len(ids)] == ids
            shown = generated if max_new_tokens else generated[: len(ids)]
            predictions.append(tokenizer.decode(shown, skip_special_tokens=True))
    return correct / max(len(prompts), 1), predictions


@torch.no_grad()
def selector_exact_match(pipeline, prompts: list[str], answers: list[str], batch_size: int = 64, n: int | None = None,
                         ratio: float | None = None, desc: str = "select",
                         method: str = "selector") -> tuple[float, float]:
    """(exact match, mean kept share of the context) of a SelectorPipeline answering from the tokens it keeps.

    Each prompt is cut at its last query separator into context and query; the answer is generated for the
    answer's token count, as in `exact_match`. `method`: the trained selector or a baseline (SELECTION_METHODS).
    """
    from tokensieve.errors import DataError
    from tokensieve.trainers.selector_lm import split_prompt

    tokenizer = pipeline.tokenizer
    correct, kept = 0, 0.0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        try:
            pairs = [split_prompt(p, pipeline.query_separator) for p in prompts[start : start + batch_size]]
        except ValueError as error:
            raise DataError(f"{desc}: a prompt has no query: {error}") from None
        contexts, queries = [c for c, _ in pairs], [q for _, q in pairs]
        targets = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers[start : start + batch_size]]
        ids, keep = pipeline.answer(contexts, queries, max(len(t) for t in targets), method=method, n=n, ratio=ratio)
        lengths = pipeline.encode(contexts, queries)["context_mask"].sum(-1)
        kept += (keep.sum(-1) / lengths).sum().item()
        correct += sum(row[: len(t)] == t for row, t in zip(ids.tolist(), targets))
    return correct / max(len(prompts), 1), kept / max(len(prompts), 1)


def _load_rows(path: str, max_examples: int | None):
    arguments = DataArguments(datasets=[{"path": path}], shuffle_seed=0, max_train_samples=max_examples)
    return load_splits(arguments)["train"]


def evaluate_files(model_path: str, files: list[str], max_examples: int | None = None, batch_size: int = 64,
                   max_new_tokens: int | None = None, output: str | None = None, memory_size: int | None = None,
                   buffer_size: int | None = None, policy: str = "gates") -> dict[str, dict]:
    """Exact match of the model at `model_path` on each prompt/completion file; optionally saved as JSON.

    A retention-gate export, or any model with `memory_size`, generates from a bounded RetentionCache holding at
    most memory_size + buffer_size tokens per layer and kv head (defaults: the export's gates.json).
    """
    from tokensieve.launch.export import GATES_CONFIG

    bounded = memory_size is not None or os.path.isfile(os.path.join(model_path, GATES_CONFIG))
    setting = {}
    if bounded:
        from tokensieve.launch.generate import load_for_generation
        from tokensieve.selectors.kv_cache import POLICIES, RetentionCache, cache_sizes

        if policy not in POLICIES:
            raise ModelError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        model, tokenizer, config = load_for_generation(model_path, policy)
        memory_size, buffer_size = cache_sizes(config, memory_size, buffer_size)
        setting = {"memory_size": memory_size, "buffer_size": buffer_size, "policy": policy}

        def make_cache():
            return RetentionCache.for_model(model, memory_size, buffer_size, policy)
    else:
        model, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=model_path))
        model.eval()
        make_cache = None
    results = {}
    for path in files:
        rows = _load_rows(path, max_examples)
        score, _ = exact_match(model, tokenizer, rows["prompt"], rows["completion"], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, desc=os.path.basename(path), make_cache=make_cache)
        results[path] = {"exact_match": score, "examples": len(rows), **setting}
        cache = f" (KV cache: {memory_size} + {buffer_size} tokens, {policy})" if bounded else ""
        print(f"{path}: exact match {score:.4f} on {len(rows)} examples{cache}", flush=True)
    _write_results(output, model_path, results)
    return results


def evaluate_selector_files(export_path: str, files: list[str], max_examples: int | None = None, batch_size: int = 64,
                            keep: int | None = None, keep_ratio: float | None = None,
                            output: str | None = None) -> dict[str, dict]:
    """Exact match of a query-selector export answering from the context tokens it keeps (learned budget unless
    `keep` tokens or a `keep_ratio` is given), and the mean kept share, on each prompt/completion file."""
    from tokensieve.launch.export import load_selector_pipeline

    pipeline = load_selector_pipeline(export_path)
    results = {}
    for path in files:
        rows = _load_rows(path, max_examples)
        score, share = selector_exact_match(pipeline, rows["prompt"], rows["completion"], batch_size, keep, keep_ratio,
                                            desc=os.path.basename(path))
        results[path] = {"exact_match": score, "examples": len(rows), "kept_share": share}
        print(f"{path}: exact match {score:.4f} on {len(rows)} examples, {share:.1%} of the context kept", flush=True)
    _write_results(output, export_path, results)
    return results


def _write_results(output: str | None, model_path: str, results: dict) -> None:
    if output:
        from tokensieve.launch.export import replace_atomically

        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"model": model_path, "results": results}, indent=2)
        replace_atomically(target, lambda p: p.write_text(text, encoding="utf-8"))
