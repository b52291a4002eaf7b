"""What every tokensieve trainer and trainer config shares, on top of TRL's.

- `ConfigDefaults`: TRL's default `gradient_checkpointing=True` under its current name (`activation_checkpointing`),
  so that building a config warns only about what the user wrote.
- `CompletionLabels`: the `eos_loss` option of the configs whose trainers build prompt/completion labels through TRL
  (TRL appends an end-of-sequence token to every completion and makes it a label; `eos_loss: false` leaves that one
  label out of the loss).
- `TrainerBase`: checks, when the trainer is built, that the private Trainer methods it overrides still exist
  upstream (`tokensieve.upstream.check_private_overrides`), and runs the loss computation with TRL's fused LM head
  projecting only labelled positions on CPU too (`fused_head_labelled_positions_only`: scoped to the loss, nothing
  changes outside our trainers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset

from tokensieve.upstream import check_private_overrides, fused_head_labelled_positions_only, resolve_checkpointing_default


class ConfigDefaults:
    """Mixin for a TRL config dataclass (first base): see the module docstring."""

    def __post_init__(self):
        resolve_checkpointing_default(self)
        super().__post_init__()


@dataclass
class CompletionLabels:
    """Config mixin (before the TRL config among the bases): which completion tokens are loss targets."""

    eos_loss: bool = field(
        default=True,
        metadata={"help": "Whether the end-of-sequence token appended to every completion (as TRL does) is a loss "
                          "target. false leaves that one label out (e.g. when the model was never taught to predict "
                          "it there: its loss would dominate and say nothing about the method)."},
    )


def without_eos_label(dataset, eos_token_id: int, dataset_name: str):
    """Take each row's final end-of-sequence token out of the loss: its label becomes -100 (TRL builds a `labels`
    column when it prepares a dataset; a dataset still carrying a `completion_mask` gets a 0 there instead)."""
    column = "labels" if "labels" in dataset.column_names else "completion_mask"
    off = -100 if column == "labels" else 0

    def drop(row):
        values = list(row[column])
        if values and values[-1] != off and row["input_ids"][-1] == eos_token_id:
            values[-1] = off
        return {column: values}

    options = {"desc": f"Leaving the end-of-sequence label out of {dataset_name} dataset"}
    return dataset.map(drop, **(options if isinstance(dataset, Dataset) else {}))  # IterableDataset: no desc


class TrainerBase:
    """Mixin for a TRL trainer (first base): see the module docstring."""

    def __init__(self, *args, **kwargs):
        check_private_overrides(type(self))
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        columns = dataset.column_names or []
        if not getattr(args, "eos_loss", True) and ("labels" in columns or "completion_mask" in columns):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = without_eos_label(dataset, tokenizer.eos_token_id, dataset_name)
        return dataset

    def compute_loss(self, *args, **kwargs):
        with fused_head_labelled_positions_only():
            return super().compute_loss(*args, **kwargs)
