"""What every tokensieve trainer and trainer config shares, on top of TRL's.

- `ConfigDefaults`: TRL's default `gradient_checkpointing=True` under its current name (`activation_checkpointing`),
  so that building a config warns only about what the user wrote.
- `TrainerBase`: checks, when the trainer is built, that the private Trainer methods it overrides still exist
  upstream (`tokensieve.upstream.check_private_overrides`), and runs the loss computation with TRL's fused LM head
  projecting only labelled positions on CPU too (`fused_head_labelled_positions_only`: scoped to the loss, nothing
  changes outside our trainers).
"""

from __future__ import annotations

from tokensieve.upstream import check_private_overrides, fused_head_labelled_positions_only, resolve_checkpointing_default


class ConfigDefaults:
    """Mixin for a TRL config dataclass (first base): see the module docstring."""

    def __post_init__(self):
        resolve_checkpointing_default(self)
        super().__post_init__()


class TrainerBase:
    """Mixin for a TRL trainer (first base): see the module docstring."""

    def __init__(self, *args, **kwargs):
        check_private_overrides(type(self))
        super().__init__(*args, **kwargs)

    def compute_loss(self, *args, **kwargs):
        with fused_head_labelled_positions_only():
            return super().compute_loss(*args, **kwargs)
