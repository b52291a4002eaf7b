"""Stop a run at the step where its loss (or a gate) stops being finite, before the optimizer applies it."""

from __future__ import annotations

import torch
from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from tokensieve.errors import TrainingError
from tokensieve.trainers.base import CompletionLabels, ConfigDefaults, TrainerBase


def check_finite(value: torch.Tensor, what: str, step: int, output_dir: str) -> None:
    if not torch.isfinite(value.detach()).all():
        raise TrainingError(
            f"step {step}: {what} is not finite (NaN or inf); stopped before the optimizer step, so the last "
            f"checkpoint in {output_dir} is intact. Lower the learning rate or check the data, then resume."
        )


class FiniteLossMixin:
    """Raises TrainingError from `training_step` when the step's loss is NaN or inf (parameters still unchanged)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_finite(loss, "the loss", self.state.global_step + 1, self.args.output_dir)
        return loss


@dataclass
class SFTBaselineConfig(ConfigDefaults, CompletionLabels, SFTConfig):
    """TRL's SFTConfig (the `sft` baseline's config; see trainers/base.py for the one default it words differently),
    plus `eos_loss` (default true, TRL's behaviour)."""


class GuardedSFTTrainer(TrainerBase, FiniteLossMixin, SFTTrainer):
    """TRL's SFTTrainer, unchanged except that a non-finite loss stops the run (the `sft` baseline)."""
