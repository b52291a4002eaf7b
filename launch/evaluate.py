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


METRICS = ("exact", "contains")
CONTAINS_SLACK = 8  # tokens generated past the answer's length when the answer only has to appear


def generation_length(answer_ids: list[int], metric: str = "exact") -> int:
    """Tokens generated to judge an answer: its own token count, + CONTAINS_SLACK when it only has to appear."""
    return len(answer_ids) + (CONTAINS_SLACK if metric == "contains" else 0)


def is_correct(tokenizer, generated: list[int], answer: str, answer_ids: list[int], metric: str = "exact") -> bool:
    """"exact": the first generated tokens are the answer's tokens; "contains": the answer (stripped) appears in the
    decoded generation."""
    if metric == "contains":
        return answer.strip() in tokenizer.decode(generated, skip_special_tokens=True)
    return generated[: len(answer_ids)] == answer_ids


@torch.no_grad()
def exact_match(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 64,
                max_new_tokens: int | None = None, desc: str = "generate", make_cache=None,
                metrics: list[str] | None = None) -> tuple[float, list[str]]:
    """Share of prompts answered right by greedy generation; also the predictions.

    A row's metric (default "exact"): "exact", the first generated tokens are the answer's tokens (generation is cut
    at the answer's token count, or at `max_new_tokens`); "contains", the answer (stripped) appears in the text
    generated for the answer's token count + CONTAINS_SLACK tokens (or `max_new_tokens`).
    `make_cache`: a function returning a fresh RetentionCache per batch for bounded-memory generation (the
    prompt is then prefilled in chunks, see `tokensieve.launch.generate.bounded_generate`).
    """
    metrics = list(metrics) if metrics is not None else ["exact"] * len(prompts)
    tokenizer.padding_side = "left"
    predictions, correct = [], 0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        batch_prompts = prompts[start : start + batch_size]
        batch_metrics = metrics[start : start + batch_size]
        answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers[start : start + batch_size]]
        lengths = [max_new_tokens or generation_length(ids, metric) for ids, metric in zip(answer_ids, batch_metrics)]
        inputs = tokenizer(batch_prompts, return_tensors="pt", padding=True).to(model.device)
        options = dict(max_new_tokens=max(lengths), do_sample=False, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
        if make_cache is None:
            output = model.generate(**inputs, **options)
        else:
            from tokensieve.launch.generate import bounded_generate

            output = bounded_generate(model, inputs["input_ids"], inputs["attention_mask"], make_cache(), **options)
        rows = zip(output[:, inputs["input_ids"].shape[1] :].tolist(), answer_ids, batch_metrics, lengths,
                   answers[start : start + batch_size])
        for generated, ids, metric, length, answer in rows:
            correct += is_correct(tokenizer, generated[:length], answer, ids, metric)
            predictions.append(tokenizer.decode(generated[:length], skip_special_tokens=True))
    return correct / max(len(prompts), 1), predictions


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8, make_cache=None,
               desc: str = "perplexity") -> tuple[float, int]:
    """(perplexity, tokens scored) of `texts`: exp of the mean next-token loss over every token after the first.

    With `make_cache` (a function returning a fresh RetentionCache) the text is read in chunks of the cache's buffer size
    through the bounded cache, each chunk predicted from what the cache kept: what a bounded cache costs the language
    model. Without it, one forward pass over the whole text.
    """
    tokenizer.padding_side = "left"
    total, count = 0.0, 0
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        inputs = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if make_cache is None:
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            from tokensieve.launch.generate import bounded_logits

            logits = bounded_logits(model, ids, mask, make_cache())
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                   reduction="none")
        scored = mask[:, :-1].bool() & mask[:, 1:].bool()
        total += losses[scored].sum().item()
        count += int(scored.sum())
    return float(torch.exp(torch.tensor(total / max(count, 1)))), count


@torch.no_grad()
def selector_exact_match(pipeline, prompts: list[str], answers: list[str], batch_size: int = 64, n: int | None = None,
                         ratio: float | None = None, desc: str = "select", method: str = "selector",
                         metrics: list[str] | None = None) -> tuple[float, float]:
    """(exact match, mean kept share of the context) of a SelectorPipeline answering from the tokens it keeps.

    Each prompt is cut at its last query separator into context and query; the answer is generated and judged
    as in `exact_match` (per-row `metrics`). `method`: the trained selector or a baseline (SELECTION_METHODS).
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
        batch_answers = answers[start : start + batch_size]
        batch_metrics = metrics[start : start + batch_size] if metrics is not None else ["exact"] * len(pairs)
        targets = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in batch_answers]
        lengths = [generation_length(t, m) for t, m in zip(targets, batch_metrics)]
        ids, keep = pipeline.answer(contexts, queries, max(lengths), method=method, n=n, ratio=ratio)
        context_lengths = pipeline.encode(contexts, queries)["context_mask"].sum(-1)
        kept += (keep.sum(-1) / context_lengths).sum().item()
        judged = zip(ids.tolist(), lengths, batch_answers, targets, batch_metrics)
        correct += sum(is_correct(tokenizer, row[:length], answer, target, metric)
                       for row, length, answer, target, metric in judged)
    return correct / max(len(prompts), 1), kept / max(len(prompts), 1)


def _load_rows(path: str, max_examples: int | None):
    arguments = DataArguments(datasets=[{"path": path}], shuffle_seed=0, max_train_samples=max_examples)
    return load_splits(arguments)["train"]


def evaluate_files(model_path: str, files: list[str], max_examples: int | None = None, batch_size: int = 64,
                   max_new_tokens: int | None = None, output: str | None = None, memory_size: int | None = None,
                   buffer_size: int | None = None, policy: str = "gates",
                   memory_ratio: float | None = None, attention: str | None = None) -> dict[str, dict]:
    """Score the model at `model_path` on each file; optionally save the numbers as JSON.

    Prompt/completion files: the share of rows answered right, by each row's `metric` column ("exact" when absent;
    see `exact_match`). Text files: perplexity. A retention-gate export, or any model with `memory_size` or
    `memory_ratio`, reads from a bounded RetentionCache holding at most memory_size + buffer_size tokens per layer and
    kv head (defaults: the export's gates.json); `memory_ratio` sets them per file from its mean length in tokens
    (M = ratio x length, buffer M / 4, as the benchmarks count a budget). `attention`: "plain" or "decayed" for
    the gates' cache (default: the export's).
    """
    from tokensieve.launch.export import GATES_CONFIG

    if memory_ratio is not None and not 0 < memory_ratio <= 1:
        raise ModelError(f"--memory-ratio must be in (0, 1], got {memory_ratio}")
    if memory_ratio is not None and memory_size is not None:
        raise ModelError("give --memory-size or --memory-ratio, not both")
    bounded = memory_size is not None or memory_ratio is not None or os.path.isfile(os.path.join(model_path,
                                                                                                 GATES_CONFIG))
    config = {}
    if bounded:
        from tokensieve.launch.generate import load_for_generation
        from tokensieve.selectors.kv_cache import POLICIES

        if policy not in POLICIES:
            raise ModelError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        model, tokenizer, config = load_for_generation(model_path, policy)
    else:
        model, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=model_path))
        model.eval()
    results = {}
    for path in files:
        rows = _load_rows(path, max_examples)
        texts = rows["text"] if "prompt" not in rows.column_names else None
        make_cache, setting, shown = None, {}, ""
        if bounded:
            make_cache, setting = _bounded_cache(model, tokenizer, config, texts or rows["prompt"], memory_size,
                                                 buffer_size, policy, memory_ratio, attention)
            decayed = ", decayed attention" if setting.get("attention") == "decayed" else ""
            shown = f" (KV cache: {setting['memory_size']} + {setting['buffer_size']} tokens, {policy}{decayed})"
        name = os.path.basename(path)
        if texts is not None:
            value, tokens = perplexity(model, tokenizer, texts, batch_size=min(batch_size, 8), make_cache=make_cache,
                                       desc=name)
            results[path] = {"perplexity": value, "examples": len(rows), "tokens": tokens, **setting}
            print(f"{path}: perplexity {value:.3f} on {len(rows)} texts ({tokens} tokens){shown}", flush=True)
            continue
        metrics = _row_metrics(path, rows)
        score, _ = exact_match(model, tokenizer, rows["prompt"], rows["completion"], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, desc=name, make_cache=make_cache, metrics=metrics)
        key, label = _score_name(set(metrics))
        results[path] = {key: score, "examples": len(rows), **setting}
        print(f"{path}: {label} {score:.4f} on {len(rows)} examples{shown}", flush=True)
    _write_results(output, model_path, results)
    return results


def _row_metrics(path: str, rows) -> list[str]:
    """Each row's metric: its `metric` column, "exact" where the file has none; an unknown one is a ModelError."""
    metrics = rows["metric"] if "metric" in rows.column_names else ["exact"] * len(rows)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ModelError(f"{path}: column 'metric' has {unknown}; expected one of {', '.join(METRICS)}")
    return metrics


def _score_name(metrics: set[str]) -> tuple[str, str]:
    """(JSON key, printed name) of a file's score: exact match, answer contained, or a mix of both."""
    if metrics <= {"exact"}:
        return "exact_match", "exact match"
    if metrics == {"contains"}:
        return "contains", "answer contained"
    return "score", "score (exact match or answer contained, per row)"


def _bounded_cache(model, tokenizer, config: dict, texts: list[str], memory_size, buffer_size, policy: str,
                   memory_ratio: float | None, attention: str | None = None):
    """(make_cache, setting) for one file: the sizes given, the export's, or a share of the file's mean length."""
    from tokensieve.selectors.kv_cache import RetentionCache, budget_sizes, cache_attention, cache_sizes

    try:
        decayed = cache_attention(config, attention, policy)
    except ValueError as error:
        raise ModelError(f"--attention: {error}") from None
    setting = {"policy": policy}
    if policy == "gates":
        setting["attention"] = "decayed" if decayed else "plain"
    if memory_ratio is not None:
        mean_length = sum(len(ids) for ids in tokenizer(list(texts))["input_ids"]) / max(len(texts), 1)
        memory_size, ratio_buffer = budget_sizes(memory_ratio, mean_length)
        buffer_size = buffer_size if buffer_size is not None else ratio_buffer
        setting.update(memory_ratio=memory_ratio, mean_tokens=round(mean_length, 1))
    memory_size, buffer_size = cache_sizes(config, memory_size, buffer_size)
    setting.update(memory_size=memory_size, buffer_size=buffer_size)

    def make_cache():
        return RetentionCache.for_model(model, memory_size, buffer_size, policy, decayed_attention=decayed)

    return make_cache, setting


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
        metrics = _row_metrics(path, rows)
        score, share = selector_exact_match(pipeline, rows["prompt"], rows["completion"], batch_size, keep, keep_ratio,
                                            desc=os.path.basename(path), metrics=metrics)
        key, label = _score_name(set(metrics))
        results[path] = {key: score, "examples": len(rows), "kept_share": share}
        print(f"{path}: {label} {score:.4f} on {len(rows)} examples, {share:.1%} of the context kept", flush=True)
    _write_results(output, export_path, results)
    return results


def _write_results(output: str | None, model_path: str, results: dict) -> None:
    if output:
        from tokensieve.launch.export import replace_atomically

        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"model": model_path, "results": results}, indent=2)
        replace_atomically(target, lambda p: p.write_text(text, encoding="utf-8"))
