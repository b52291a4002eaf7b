"""The method registry: recipe `method:` name -> (config class, trainer class).

A new method is one line here: its TRL-style config dataclass and its trainer. Plain dict, no dynamic imports:
a recipe can only name what is registered.
"""

from typing import NamedTuple

from tokensieve.trainers.guards import GuardedSFTTrainer, SFTBaselineConfig
from tokensieve.trainers.query_selector import QuerySelectorConfig, QuerySelectorTrainer
from tokensieve.trainers.retention import RetentionConfig, RetentionTrainer
from tokensieve.trainers.token_loss import TokenLossConfig, TokenLossTrainer


class Method(NamedTuple):
    """How to configure and build the trainer of one training method."""

    config_class: type
    trainer_class: type

    def build_trainer(self, model, args, train_dataset, eval_dataset=None, processing_class=None):
        return self.trainer_class(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=processing_class)


METHODS: dict[str, Method] = {
    # plain SFT (TRL's SFTTrainer, stopping on a non-finite loss): the baseline of every method
    "sft": Method(SFTBaselineConfig, GuardedSFTTrainer),
    # token-level selection or weighting: ssToken, Rho-1, PRIOR, column weights, DFT (trainers/token_loss.py)
    "token_loss": Method(TokenLossConfig, TokenLossTrainer),
    # TRIM-KV retention gates: distillation from the gate-free model + capacity loss (trainers/retention.py)
    "trim_kv": Method(RetentionConfig, RetentionTrainer),
    # QTSplus-style query selector in front of the frozen LM (trainers/query_selector.py)
    "query_selector": Method(QuerySelectorConfig, QuerySelectorTrainer),
}
