"""Exact-match evaluation: greedy generation on prompt/completion test files, compared with the completions.

`tokensieve eval MODEL --data FILE [--data FILE ...]` prints one row per file and can write the numbers as
JSON. A prediction is correct when the first tokens generated equal the completion's tokens: generation is
cut at the answer's length, so a model trained to go on after the answer (the multi-question training rows
of mqar and needle-qa) is judged on the answer alone; EOS is not required. Prompts are left-padded and
generated in batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokensieve.data.loading import DataArguments, load_splits
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


def evaluate_files(model_path: str, files: list[str], max_examples: int | None = None, batch_size: int = 64,
                   max_new_tokens: int | None = None, output: str | None = None) -> dict[str, dict]:
    """Exact match of the model at `model_path` on each prompt/completion file; optionally saved as JSON."""
    model, tokenizer = load_model_and_tokenizer(ModelArguments(name_or_path=model_path))
    model.eval()
    results = {}
    for path in files:
        data = load_splits(DataArguments(datasets=[{"path": path}], shuffle_seed=0, max_train_samples=max_examples))
        rows = data["train"]
        score, _ = exact_match(model, tokenizer, rows["prompt"], rows["completion"], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, desc=os.path.basename(path))
        results[path] = {"exact_match": score, "examples": len(rows)}
        print(f"{path}: exact match {score:.4f} on {len(rows)} examples", flush=True)
    if output:
        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(json.dumps({"model": model_path, "results": results}, indent=2), encoding="utf-8")
        os.replace(temporary, target)
    return results
