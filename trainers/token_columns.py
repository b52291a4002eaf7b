"""Per-token dataset columns (history losses, token weights, curated masks) and the collator that carries them.

A per-token column holds, for each example, one number per response token: the tokens whose label is not -100,
in order, as the recipe's tokenizer splits them (what `tokensieve curate` writes). The collator places the numbers
at those label positions of the padded batch, so they line up with the labels and the per-token losses.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils.rnn import pad_sequence

from tokensieve.errors import EXAMPLE_INDEX, DataError


def response_token_count(labels: list[int]) -> int:
    return sum(1 for label in labels if label != -100)


def check_token_column(dataset, column: str, dataset_name: str, truncated_at: int | None, keep_end: bool = False):
    """Raise DataError naming the example if `column` is not a list of finite numbers, one per response token.

    `truncated_at` (max_length): a truncated example has fewer label tokens than its column has numbers; the
    numbers of the cut tokens are then dropped (from the end, or from the start with keep_end).
    """
    if column not in dataset.column_names:
        raise DataError(f"{dataset_name} dataset: column '{column}' (per-token values) is missing; "
                        f"columns are {', '.join(dataset.column_names)}")

    def check(batch):
        trimmed = []
        for i, (values, labels) in enumerate(zip(batch[column], batch["labels"])):
            index = batch[EXAMPLE_INDEX][i] if EXAMPLE_INDEX in batch else "?"
            n = response_token_count(labels)
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
                raise DataError(f"{dataset_name} dataset, example {index}: column '{column}' must be a list of "
                                f"numbers (one per response token), got {type(values).__name__}")
            if any(not math.isfinite(v) for v in values):
                raise DataError(f"{dataset_name} dataset, example {index}: column '{column}' holds NaN or inf")
            cut = truncated_at is not None and len(labels) >= truncated_at
            if len(values) != n and not (cut and len(values) > n):
                raise DataError(f"{dataset_name} dataset, example {index}: column '{column}' has {len(values)} "
                                f"values but the example has {n} response tokens")
            trimmed.append(values[len(values) - n:] if keep_end else values[:n])
        return {column: trimmed}

    return dataset.map(check, batched=True, desc=f"Checking '{column}' of {dataset_name} dataset")


class TokenColumnCollator:
    """Wraps TRL's collator: pads the per-token columns onto the label positions, and the reference inputs."""

    def __init__(self, collator, token_columns: list[str], pad_token_id: int, reference: bool = False):
        self.collator = collator
        self.token_columns = token_columns
        self.pad_token_id = pad_token_id
        self.reference = reference

    def __call__(self, examples: list[dict]) -> dict:
        keys = list(self.token_columns) + (["reference_input_ids", "reference_labels"] if self.reference else [])
        keys = [key for key in keys if key in examples[0]]  # e.g. ground truth in the training data only
        extras = {key: [example[key] for example in examples] for key in keys}
        batch = self.collator([{k: v for k, v in example.items() if k not in keys} for example in examples])
        response = batch["labels"] != -100
        for column in (c for c in self.token_columns if c in extras):
            values = torch.zeros(response.shape, dtype=torch.float32)
            flat = [v for row in extras[column] for v in row]
            values[response] = torch.tensor(flat, dtype=torch.float32)
            batch[column] = values
        if self.reference:
            ids = [torch.tensor(row) for row in extras["reference_input_ids"]]
            batch["reference_input_ids"] = pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)
            batch["reference_attention_mask"] = pad_sequence([torch.ones_like(r) for r in ids], batch_first=True)
            labels = [torch.tensor(row) for row in extras["reference_labels"]]
            batch["reference_labels"] = pad_sequence(labels, batch_first=True, padding_value=-100)
        return batch
