"""What every tokensieve trainer and trainer config shares, on top of TRL's.

- `ConfigDefaults`: TRL's default `gradient_checkpointing=True` under its current name (`activation_checkpointing`),
  so that building a config warns only about what the user wrote.
- `CompletionLabels`: the `eos_loss` option of the configs whose trainers build prompt/completion labels through TRL
  (TRL appends an end-of-sequence token to every completion and makes it a label; `eos_loss: false` leaves that one
  label out of the loss).
- `SmallModuleTrainer`: what the gate and the selector trainers share: a small module trains on a frozen model
  (optionally with LoRA adapters), its metrics are averaged over ranks, and its export and checkpoints hold the
  module's own files (plus the adapter), never the frozen weights.
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


class SmallModuleTrainer:
    """Mixin (before TrainerBase among the bases) for a trainer whose trainable part is a small module on a frozen
    model. Subclasses set `module_marker` (a substring of its parameter names) and `module_file` (its weights file
    in an export), and implement `save_module(unwrapped, folder)` and `load_module(unwrapped, folder)`."""

    module_marker: str
    module_file: str

    def freeze_all_but_module(self, model, train_lora: bool) -> None:
        """Only the module trains (and the LoRA adapters, when `train_lora`)."""
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.module_marker in name or (train_lora and "lora_" in name))

    def log_means(self, mode: str, stats: dict) -> None:
        """Each statistic averaged over the ranks, into the trainer's logged metrics."""
        import torch

        for name, value in stats.items():
            gathered = self.accelerator.gather_for_metrics(torch.as_tensor(value, device=self.args.device).float()[None])
            self._metrics[mode][name].append(gathered.mean().item())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The module's files (and the LoRA adapter, if any, and the tokenizer) into `output_dir`; the frozen base
        weights are not copied: the module's config names the base model they belong to."""
        output_dir = output_dir or self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.args.should_save:
            self.save_module(unwrapped, output_dir)
        if hasattr(unwrapped, "peft_config"):
            super().save_model(output_dir, _internal_call)  # the adapter (and tokenizer)
        elif self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        import os

        unwrapped = self.accelerator.unwrap_model(model or self.model)
        saved = os.path.exists(os.path.join(resume_from_checkpoint, self.module_file))
        if hasattr(unwrapped, "peft_config") or not saved:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if saved:
            self.load_module(unwrapped, resume_from_checkpoint)
