"""The method registry: recipe `method:` name -> (config class, trainer factory).

A new method is one line here: its TRL-style config dataclass and a function that builds its trainer.
Plain dict, no dynamic imports: a recipe can only name what is registered.
"""

from typing import Callable, NamedTuple

from trl import SFTConfig

from tokensieve.trainers.guards import GuardedSFTTrainer
from tokensieve.trainers.query_selector import QuerySelectorConfig, QuerySelectorTrainer
from tokensieve.trainers.retention import RetentionConfig, RetentionTrainer
from tokensieve.trainers.token_loss import TokenLossConfig, TokenLossTrainer


class Method(NamedTuple):
    """How to configure and build the trainer of one training method."""

    config_class: type
    build_trainer: Callable  # (model, args, train_dataset, eval_dataset, processing_class) -> Trainer


def build_sft_trainer(model, args, train_dataset, eval_dataset=None, processing_class=None) -> GuardedSFTTrainer:
    """Plain supervised fine-tuning: TRL's SFTTrainer (stopping on a non-finite loss), the baseline of every method."""
    return GuardedSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )


def build_token_loss_trainer(model, args, train_dataset, eval_dataset=None, processing_class=None) -> TokenLossTrainer:
    """Token-level selection or weighting (ssToken, Rho-1, PRIOR, column weights, DFT): see trainers/token_loss.py."""
    return TokenLossTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )


def build_retention_trainer(model, args, train_dataset, eval_dataset=None, processing_class=None) -> RetentionTrainer:
    """TRIM-KV retention gates: distillation from the gate-free model + capacity loss (trainers/retention.py)."""
    return RetentionTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )


def build_query_selector_trainer(model, args, train_dataset, eval_dataset=None,
                                 processing_class=None) -> QuerySelectorTrainer:
    """QTSplus-style query selector in front of the frozen LM (trainers/query_selector.py)."""
    return QuerySelectorTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )


METHODS: dict[str, Method] = {
    "sft": Method(SFTConfig, build_sft_trainer),
    "token_loss": Method(TokenLossConfig, build_token_loss_trainer),
    "trim_kv": Method(RetentionConfig, build_retention_trainer),
    "query_selector": Method(QuerySelectorConfig, build_query_selector_trainer),
}
