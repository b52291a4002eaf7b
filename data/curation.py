"""Token-level data curation: score every response token of a dataset, write per-token columns and a report.

    tokensieve curate recipes/curate.yaml

Columns written (one value per response token, the tokens whose label is not -100 after the same tokenization
training uses, EOS included; the trainers read them as per-token columns):
    token_scores   the scorer's score (higher = more worth training on)
    token_mask     1 for the top `keep_ratio` of tokens (per example, or over the whole dataset), else 0
    token_weights  prior only: PRIOR weights, mean 1 per example
and per example: score_mean, score_max, num_response_tokens, kept_tokens. `keep_examples` < 1 keeps only the top
share of examples by score_mean.

Scorers (model = the recipe's model; reference = curate.reference_model):
    reference_loss  CE under the model                              (offline history losses for ssToken)
    excess_loss     CE(model) - CE(reference)                      (Rho-1 / TokenCleaning, model = base)
    prior           1 - p under the model given the prompt without its condition (PRIOR)
    attention       attention of each response token to the prompt, one layer (ssToken's semantic score)
    sstoken         gamma * minmax(CE(reference) - CE(model)) + (1 - gamma) * attention  (reference = history)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokensieve.data.formats import detect_format, is_conversational
from tokensieve.data.tokenize import tokenize_prompt_completion
from tokensieve.errors import DataError, check_values
from tokensieve.files import replace_atomically
from tokensieve.selectors.reference import add_reference_inputs
from tokensieve.selectors.token_scores import (
    attention_to_prompt,
    capture_attention_inputs,
    minmax_per_row,
    prior_weights,
    realign_reference,
    share_count,
    token_logprobs,
    top_k_per_row,
)

CURATE_SCORERS = ("reference_loss", "excess_loss", "prior", "attention", "sstoken")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class CurateConfig:
    """The `curate:` section of a curation recipe."""

    output: str = field(metadata={"help": "Where the scored dataset goes: a .jsonl or .parquet file, or a folder "
                                          "(datasets' save_to_disk)."})
    scorer: str = field(default="excess_loss", metadata={"help": f"One of {', '.join(CURATE_SCORERS)}."})
    reference_model: str | None = field(
        default=None, metadata={"help": "excess_loss: the reference (clean) model; sstoken: the history model."}
    )
    reference_prompt_column: str = field(
        default="prompt_without_context", metadata={"help": "prior: the prompt the model sees (without the condition)."}
    )
    prior_alpha: float = field(default=1.0, metadata={"help": "prior: w = (1 - p)^alpha."})
    gamma: float = field(default=0.5, metadata={"help": "sstoken: weight of the loss difference vs attention."})
    attention_layer: int = field(default=-1, metadata={"help": "attention/sstoken: the layer recomputed."})
    attention_sink_tokens: int = field(default=0, metadata={"help": "attention/sstoken: prompt tokens left out."})
    keep_ratio: float = field(default=0.6, metadata={"help": "Share of response tokens marked in token_mask."})
    mask_level: str = field(default="sample", metadata={"help": "token_mask per example ('sample') or 'global'."})
    keep_examples: float = field(default=1.0, metadata={"help": "Write only this top share of examples by score_mean."})
    batch_size: int = field(default=16, metadata={"help": "Examples per forward."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate tokenized examples to this length."})
    report_dir: str | None = field(default=None, metadata={"help": "Report folder (default: <output>.report)."})
    report_examples: int = field(default=20, metadata={"help": "Examples shown token by token in the report."})

    def __post_init__(self):
        checks = [
            (self.scorer in CURATE_SCORERS, "scorer", f"one of {', '.join(CURATE_SCORERS)}", self.scorer),
            (0.0 < self.keep_ratio <= 1.0, "keep_ratio", "in (0, 1]", self.keep_ratio),
            (0.0 < self.keep_examples <= 1.0, "keep_examples", "in (0, 1]", self.keep_examples),
            (self.mask_level in ("sample", "global"), "mask_level", "'sample' or 'global'", self.mask_level),
            (0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]", self.gamma),
            (self.batch_size >= 1, "batch_size", ">= 1", self.batch_size),
            (self.max_length is None or self.max_length >= 2, "max_length", ">= 2 or null", self.max_length),
        ]
        check_values(checks)
        if self.scorer in ("excess_loss", "sstoken") and not self.reference_model:
            raise ValueError(f"reference_model is required by scorer {self.scorer}")
        if not (self.output.endswith(OUTPUT_SUFFIXES) or not Path(self.output).suffix):
            raise ValueError(f"output must end in {' or '.join(OUTPUT_SUFFIXES)} or be a folder, got {self.output!r}")


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _batch(rows: list[dict], pad_id: int, ids_key="input_ids", labels_key="labels"):
    ids = _pad([r[ids_key] for r in rows], pad_id)
    mask = _pad([[1] * len(r[ids_key]) for r in rows], 0)
    labels = _pad([r[labels_key] for r in rows], -100)
    return ids, mask, labels


def _attention_module(model, layer: int):
    return model.get_decoder().layers[layer].self_attn


class TokenScorer:
    """Computes one scorer's per-token scores for batches of tokenized rows."""

    def __init__(self, config: CurateConfig, model, tokenizer, reference=None):
        self.config, self.model, self.tokenizer, self.reference = config, model, tokenizer, reference
        self.device = next(model.parameters()).device

    def _logprobs(self, model, ids, mask, labels):
        return token_logprobs(model, ids.to(self.device), mask.to(self.device), labels.to(self.device)).cpu()

    def _attention(self, ids, mask, labels):
        attention = _attention_module(self.model, self.config.attention_layer)
        with capture_attention_inputs(attention) as captured:
            logprobs = self._logprobs(self.model, ids, mask, labels)
        prompt = (labels == -100) & mask.bool()
        scores = attention_to_prompt(attention, captured["hidden_states"], captured["position_embeddings"],
                                     prompt.to(self.device), mask.to(self.device),
                                     sink_tokens=self.config.attention_sink_tokens)
        return scores[:, :-1].cpu(), logprobs

    def score(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scores, response mask, weights or None), each [B, T-1] aligned with labels[:, 1:]."""
        config, pad_id = self.config, self.tokenizer.pad_token_id
        ids, mask, labels = _batch(rows, pad_id)
        response = labels[:, 1:] != -100
        weights = None
        if config.scorer == "reference_loss":
            scores = -self._logprobs(self.model, ids, mask, labels)
        elif config.scorer == "excess_loss":
            scores = self._logprobs(self.reference, ids, mask, labels) - self._logprobs(self.model, ids, mask, labels)
        elif config.scorer == "attention":
            scores, _ = self._attention(ids, mask, labels)
        elif config.scorer == "sstoken":
            attention, logprobs = self._attention(ids, mask, labels)
            rel = logprobs - self._logprobs(self.reference, ids, mask, labels)  # L_his - L_cur
            scores = config.gamma * minmax_per_row(rel, response) + (1 - config.gamma) * attention
        else:  # prior: the model scores the response after the prompt without its condition
            ref_ids, ref_mask, ref_labels = _batch(rows, pad_id, "reference_input_ids", "reference_labels")
            ref_logprobs = self._logprobs(self.model, ref_ids, ref_mask, ref_labels)
            moved = realign_reference(ref_logprobs, ref_labels, response)
            scores = (1.0 - moved.exp()).masked_fill(~response, 0.0)
            weights = prior_weights(moved, response, config.prior_alpha)
        return scores.masked_fill(~response, 0.0), response, weights


def _tokenized(dataset, tokenizer, config: CurateConfig):
    fmt = detect_format(dataset)
    if fmt != "prompt_completion" or is_conversational(dataset, fmt):
        raise DataError(f"curate reads plain-text prompt/completion datasets; this one is {fmt}"
                        f"{' (conversational)' if is_conversational(dataset, fmt) else ''}")
    dataset = tokenize_prompt_completion(dataset, tokenizer)
    if config.max_length is not None:
        n = config.max_length
        dataset = dataset.map(lambda r: {"input_ids": r["input_ids"][:n], "labels": r["labels"][:n]},
                              desc="Truncating")
    if config.scorer == "prior":
        dataset = add_reference_inputs(dataset, tokenizer, config.reference_prompt_column, "curate")
    for index, labels in enumerate(dataset["labels"]):
        if all(label == -100 for label in labels[1:]):
            raise DataError(f"curate dataset, example {index}: no response tokens left to score "
                            f"(empty completion, or the prompt fills max_length)")
    return dataset


def score_dataset(dataset, model, tokenizer, config: CurateConfig, reference=None) -> dict:
    """Per-token scores (and PRIOR weights) of every example, lists of floats in label order, and the tokenized rows."""
    data = _tokenized(dataset, tokenizer, config)
    scorer = TokenScorer(config, model, tokenizer, reference)
    scored = {"token_scores": [], "token_weights": [], "tokenized": data}
    batches = data.iter(batch_size=config.batch_size)
    total = math.ceil(len(data) / config.batch_size)
    for batch in tqdm(batches, total=total, desc=f"Scoring tokens ({config.scorer})", unit="batch"):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        scores, response, weights = scorer.score(rows)
        for b in range(scores.shape[0]):
            scored["token_scores"].append(scores[b][response[b]].tolist())
            if weights is not None:
                scored["token_weights"].append(weights[b][response[b]].tolist())
    return scored


def token_masks(scores: list[list[float]], keep_ratio: float, level: str) -> list[list[int]]:
    """1 for the top keep_ratio of tokens: ceil(ratio * n) per example, or ceil(ratio * N) of the whole dataset."""
    if level == "global":
        flat = sorted((s for row in scores for s in row), reverse=True)
        k = share_count(keep_ratio, len(flat))
        threshold = flat[k - 1] if k else math.inf
        return [[int(s >= threshold) for s in row] for row in scores]
    masks = []
    for row in scores:
        values = torch.tensor(row)[None]
        k = torch.tensor([share_count(keep_ratio, len(row))])
        masks.append(top_k_per_row(values, torch.ones_like(values, dtype=torch.bool), k)[0].int().tolist())
    return masks


def write_atomically(dataset, output: str) -> None:
    """Write `dataset` to a temporary name next to `output`, then rename: a failed run leaves nothing behind."""
    path = Path(output)

    def write(tmp: Path) -> None:
        if path.suffix == ".jsonl":
            dataset.to_json(str(tmp), lines=True, force_ascii=False)
        elif path.suffix == ".parquet":
            dataset.to_parquet(str(tmp))
        else:
            dataset.save_to_disk(str(tmp))

    replace_atomically(path, write)


def curate(dataset, model, tokenizer, config: CurateConfig, reference=None, model_name: str = "") -> dict:
    """Score `dataset`, add the per-token and per-example columns, write it and the report; return the summary."""
    from tokensieve.data.curation_report import write_report

    if config.scorer == "prior" and config.reference_prompt_column not in dataset.column_names:
        raise DataError(f"curate dataset: column '{config.reference_prompt_column}' (curate.reference_prompt_column, "
                        f"the prompt without its condition) is missing; columns are {', '.join(dataset.column_names)}")
    scored = score_dataset(dataset, model, tokenizer, config, reference)
    scores = scored["token_scores"]
    masks = token_masks(scores, config.keep_ratio, config.mask_level)
    new = {
        "token_scores": scores,
        "token_mask": masks,
        "score_mean": [sum(row) / len(row) for row in scores],
        "score_max": [max(row) for row in scores],
        "num_response_tokens": [len(row) for row in scores],
        "kept_tokens": [sum(row) for row in masks],
    }
    if scored["token_weights"]:
        new["token_weights"] = scored["token_weights"]
    out = dataset.remove_columns([c for c in new if c in dataset.column_names])
    for name, values in new.items():
        out = out.add_column(name, values)
    order = sorted(range(len(out)), key=lambda i: -new["score_mean"][i])
    if config.keep_examples < 1.0:
        keep = sorted(order[: math.ceil(config.keep_examples * len(out))])
        out = out.select(keep)
    write_atomically(out, config.output)
    summary = {
        "scorer": config.scorer, "model": model_name, "reference_model": config.reference_model,
        "examples_scored": len(scores), "examples_written": len(out), "output": config.output,
        "response_tokens": sum(new["num_response_tokens"]), "kept_tokens": sum(new["kept_tokens"]),
        "keep_ratio": config.keep_ratio, "mask_level": config.mask_level,
    }
    report_dir = config.report_dir or f"{config.output.rstrip('/')}.report"
    summary["report"] = write_report(report_dir, scored, new, tokenizer, dataset, config, summary)
    return summary
