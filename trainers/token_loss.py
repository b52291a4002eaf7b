"""One trainer for token-level loss selection and token-weighted next-token prediction.

    loss = sum_t w_t * CE_t / Z        (over the response tokens of the whole accumulated global batch)

A scorer decides the weights w (docs/methods.md sections 1-3):
    sstoken  0/1: top rho of each sample by gamma * minmax(L_his - L_cur) + (1 - gamma) * attention-to-prompt
    rho1     0/1: top ratio of the batch by excess loss L_cur - L_ref
    random   0/1: a random selection at the same ratio (the control for any selection)
    prior    (1 - p_ref)^alpha, mean 1 per sequence; the reference scores the response without its condition
    column   weights (or a 0/1 mask) read from a dataset column, e.g. written by `tokensieve curate`
    dft      p_t, detached
    none     1 (plain SFT through the same code path)
Z is the number of kept tokens (selections: known from the labels alone, sum of ceil(rho * n) per sample or
per micro-batch), the sum of the column weights, or the number of response tokens (prior, dft, none); it is
counted over all micro-batches of an optimizer step and all ranks before any forward, so the loss and gradients
do not depend on how the global batch is split.
"""

from __future__ import annotations

import math
import os
import random
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.models.utils import prepare_deepspeed

from tokensieve.errors import EXAMPLE_INDEX, TrainingError, check_values
from tokensieve.selectors.reference import add_reference_inputs
from tokensieve.selectors.selection_quality import KINDS, KINDS_COLUMN, NOISE_KINDS, selection_quality
from tokensieve.selectors.token_scores import (
    attention_per_label,
    attention_to_prompt,
    capture_attention_inputs,
    dft_weights,
    excess_loss_select,
    kept_count,
    prior_weights,
    random_scores,
    realign_reference,
    select_top_share,
    sstoken_score,
    token_logprobs,
)
from tokensieve.trainers.base import CompletionLabels, ConfigDefaults, TrainerBase
from tokensieve.trainers.guards import FiniteLossMixin
from tokensieve.trainers.history import (ParameterEma, first_changed_layer, frozen_copy, load_reference_model,
                                         start_model_source)
from tokensieve.trainers.token_columns import TokenColumnCollator, check_token_column
from tokensieve.upstream import decoder_from_layer

logger = logging.get_logger(__name__)

SCORERS = ("sstoken", "rho1", "random", "prior", "column", "dft", "none")
HISTORY_MODES = ("base", "ema", "offline")
SELECTION_LEVELS = ("sample", "batch")
ATTENTION_ROWS = ("own", "predicting")


@dataclass
class TokenLossConfig(ConfigDefaults, CompletionLabels, SFTConfig):
    """SFTConfig plus the token scorer and its options. Defaults follow docs/methods.md."""

    token_scorer: str = field(default="sstoken", metadata={"help": f"How tokens are weighted: one of {SCORERS}."})
    select_ratio: float = field(
        default=0.6,
        metadata={"help": "Share of response tokens kept by sstoken (rho), rho1 and random selection, in (0, 1]."},
    )
    selection_level: str = field(
        default="sample",
        metadata={"help": "sstoken/random: keep the top share of each sample ('sample') or of the micro-batch "
                          "('batch'). rho1 always selects per batch."},
    )
    gamma: float = field(default=0.5, metadata={"help": "ssToken: weight of the loss-difference score vs attention."})
    gamma_warmup_steps: float = field(
        default=0.2,
        metadata={"help": "ssToken: optimizer steps at the start that use gamma = 0 (attention only), while the "
                          "history and current models are still nearly the same. A value below 1 is a share of the "
                          "training steps (as TrainingArguments.warmup_steps); default 0.2, as the authors' code."},
    )
    attention_row: str = field(
        default="own",
        metadata={"help": "ssToken: whose attention row scores a response token: 'own' (the token's own row, as "
                          "the authors' code) or 'predicting' (the row of the position that predicts it)."},
    )
    attention_layer: int = field(
        default=-1, metadata={"help": "ssToken: decoder layer whose attention to the prompt is recomputed."}
    )
    attention_sink_tokens: int = field(
        default=0, metadata={"help": "ssToken: leave the first N prompt tokens (attention sinks) out of the score."}
    )
    history_model: str = field(
        default="base",
        metadata={"help": "ssToken history model: 'base' (LoRA: adapters disabled; full fine-tuning: a frozen copy "
                          "of the start), 'ema' (EMA of the trainable parameters) or 'offline' (a dataset column)."},
    )
    history_from_first_adapted_layer: bool = field(
        default=True,
        metadata={"help": "ssToken 'base' / 'ema' history on a model whose first decoder layers are frozen and carry "
                          "no adapter (LoRA on the later layers only): start the history pass at the first layer that "
                          "can differ, from the hidden state the training forward computed there (the same by "
                          "construction), so the history costs only the later layers. Checked once against a full "
                          "history pass; where they differ the full pass is used, with a warning."},
    )
    ema_alpha: float = field(default=0.99, metadata={"help": "ssToken EMA history: theta_his <- a*theta_his + (1-a)*theta."})
    ema_update_interval: int = field(default=1, metadata={"help": "ssToken EMA history: update every N optimizer steps."})
    history_loss_column: str = field(
        default="history_loss",
        metadata={"help": "ssToken offline history: column of per-response-token history losses."},
    )
    reference_model: str | None = field(
        default=None,
        metadata={"help": "rho1: a model trained on clean data (hub name or local path; required). prior: 'base' "
                          "(the default: the starting model, adapters disabled under LoRA, else a frozen copy) or "
                          "a hub name / local path."},
    )
    reference_prompt_column: str | None = field(
        default="prompt_without_context",
        metadata={"help": "prior: column with the prompt the reference sees (the prompt without its condition). "
                          "None scores the full sequence."},
    )
    prior_alpha: float = field(default=1.0, metadata={"help": "prior: w = (1 - p_ref)^alpha."})
    token_weights_column: str = field(
        default="token_weights", metadata={"help": "column scorer: column of per-response-token weights (or 0/1)."}
    )

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.token_scorer in SCORERS, "token_scorer", f"one of {', '.join(SCORERS)}", self.token_scorer),
            (0.0 < self.select_ratio <= 1.0, "select_ratio", "in (0, 1]", self.select_ratio),
            (self.selection_level in SELECTION_LEVELS, "selection_level", "'sample' or 'batch'", self.selection_level),
            (0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]", self.gamma),
            (self.gamma_warmup_steps >= 0, "gamma_warmup_steps", ">= 0", self.gamma_warmup_steps),
            (self.attention_row in ATTENTION_ROWS, "attention_row", f"one of {', '.join(ATTENTION_ROWS)}",
             self.attention_row),
            (not (self.token_scorer == "rho1" and self.reference_model in (None, "base")), "reference_model",
             "a model trained on clean data (hub name or local path) for rho1: Rho-1's excess loss is over such a "
             "reference ('base', the starting model, would give L_cur - L_base, i.e. minus ssToken's REL)",
             self.reference_model),
            (self.attention_sink_tokens >= 0, "attention_sink_tokens", ">= 0", self.attention_sink_tokens),
            (self.history_model in HISTORY_MODES, "history_model", f"one of {', '.join(HISTORY_MODES)}",
             self.history_model),
            (0.0 <= self.ema_alpha < 1.0, "ema_alpha", "in [0, 1)", self.ema_alpha),
            (self.ema_update_interval >= 1, "ema_update_interval", ">= 1", self.ema_update_interval),
            (self.prior_alpha >= 0.0, "prior_alpha", ">= 0", self.prior_alpha),
            (not (self.packing and self.token_columns()), "packing", "false with per-token columns", self.packing),
        ]
        check_values(checks)

    def token_columns(self) -> list[str]:
        """The per-token dataset columns this configuration reads."""
        if self.token_scorer == "sstoken" and self.history_model == "offline":
            return [self.history_loss_column]
        if self.token_scorer == "column":
            return [self.token_weights_column]
        return []

    @property
    def uses_reference_prompt(self) -> bool:
        return self.token_scorer == "prior" and self.reference_prompt_column is not None


class _HistoryUpdate(TrainerCallback):
    """Advance the EMA history after each optimizer step."""

    def __init__(self, trainer: "TokenLossTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.ema.update(self.trainer.accelerator.unwrap_model(self.trainer.model), state.global_step)


class TokenLossTrainer(TrainerBase, FiniteLossMixin, SFTTrainer):
    """SFTTrainer whose loss weights each response token by a pluggable scorer (see the module docstring)."""

    _tag_names = ["trl", "sft", "tokensieve", "token-loss"]
    loss_is_scaled_for_ga = True  # compute_loss divides by the global normaliser itself

    def __init__(self, model, args: TokenLossConfig, *rest, **kwargs):
        self.ema = None
        self._ground_truth = False  # whether the training data has token kinds (selection scored against them)
        self.frozen = None  # the start model (or a reference), when there is no LoRA adapter to disable
        base_reference = args.token_scorer == "prior" and args.reference_model in (None, "base")
        needs_base = (args.token_scorer == "sstoken" and args.history_model == "base") or base_reference
        is_peft = hasattr(model, "disable_adapter")
        zero3 = is_deepspeed_zero3_enabled()
        reference = args.reference_model if args.token_scorer in ("rho1", "prior") and not base_reference else None
        if zero3 and args.token_scorer == "sstoken" and args.history_model == "ema":
            raise TrainingError("history_model 'ema' is not supported under DeepSpeed ZeRO-3 (the EMA would need the "
                                "partitioned parameters gathered every step); use 'base' or 'offline', or ZeRO-2")
        if needs_base and not is_peft:
            if zero3:
                # deepcopy cannot copy partitioned parameters: reload the start model, partitioned like the trainee.
                reference = start_model_source(model)
            else:
                self.frozen = frozen_copy(model)  # one more full copy of the weights (say so in the docs)
        super().__init__(model, args, *rest, **kwargs)
        self.data_collator = TokenColumnCollator(self.data_collator, self._token_columns(),
                                                 self.processing_class.pad_token_id, args.uses_reference_prompt)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if reference is not None:
            trust = bool((args.model_init_kwargs or {}).get("trust_remote_code", False))
            self.frozen = load_reference_model(reference, unwrapped, trust_remote_code=trust)
        if self.frozen is not None:
            if self.is_deepspeed_enabled:  # ZeRO-3 partitions it like the trainee; lower stages replicate it
                self.frozen = prepare_deepspeed(self.frozen, self.accelerator)
            else:
                self.frozen.to(self.args.device)
        if args.token_scorer == "sstoken" and args.history_model == "ema":
            self.ema = ParameterEma(unwrapped, args.ema_alpha, args.ema_update_interval)
            self.add_callback(_HistoryUpdate(self))
        self._rng = random.Random(args.seed)
        self._history_start = None  # the decoder layer the history pass starts at (0: the whole model); see below
        self._history_start_checked = False

    # --- data ------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        needs_columns = args.token_columns() or args.uses_reference_prompt
        if needs_columns and EXAMPLE_INDEX not in dataset.column_names:
            dataset = dataset.add_column(EXAMPLE_INDEX, list(range(len(dataset))))
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        truth = KINDS_COLUMN in dataset.column_names
        if dataset_name == "train":
            self._ground_truth = truth
        for column in args.token_columns() + ([KINDS_COLUMN] if truth else []):
            dataset = check_token_column(dataset, column, dataset_name, args.max_length,
                                         keep_end=args.truncation_mode == "keep_end")
        if args.uses_reference_prompt:
            dataset = add_reference_inputs(dataset, processing_class, args.reference_prompt_column, dataset_name)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = self._token_columns() + (["reference_input_ids", "reference_labels"]
                                             if self.args.uses_reference_prompt else [])
        self._signature_columns = list(self._signature_columns) + [c for c in extra if c not in self._signature_columns]

    # --- the normaliser --------------------------------------------------------------------------------------------

    def _local_normaliser(self, batch) -> torch.Tensor:
        """Z of one micro-batch: what the scorer's weights will sum to, from the labels (and columns) alone."""
        mask = batch["labels"][:, 1:] != -100
        scorer, ratio = self.args.token_scorer, self.args.select_ratio
        if scorer in ("sstoken", "random"):
            return torch.tensor(kept_count(mask, ratio, self.args.selection_level))
        if scorer == "rho1":
            return torch.tensor(kept_count(mask, ratio, "batch"))
        if scorer == "column":
            return batch[self.args.token_weights_column][:, 1:][mask].double().sum()
        return mask.sum()

    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = sum(self._local_normaliser(batch) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    # --- scoring -----------------------------------------------------------------------------------------------------

    def _base_logprobs(self, model, input_ids, attention_mask, labels) -> torch.Tensor:
        """Per-token log-probs under the start model: LoRA adapters disabled, or the frozen copy / reference."""
        if self.frozen is not None:
            return token_logprobs(self.frozen, input_ids, attention_mask, labels)
        unwrapped = self.accelerator.unwrap_model(model)
        with unwrapped.disable_adapter():
            return token_logprobs(unwrapped, input_ids, attention_mask, labels)

    def _history_loss(self, model, inputs, start: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token history losses [B, T-1]; with `start` > 0 the pass begins at decoder layer `start` from
        `hidden`, the training forward's input to that layer (`_history_start_layer`)."""
        args = self.args
        if args.history_model == "offline":
            return inputs[args.history_loss_column][:, 1:].float()
        unwrapped = self.accelerator.unwrap_model(model)
        skip = decoder_from_layer(self._decoder(model), start, hidden) if start else nullcontext()
        with skip:
            if args.history_model == "ema":
                with self.ema.swapped_in(unwrapped):
                    return -token_logprobs(unwrapped, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            return -self._base_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])

    def _history_start_layer(self, model) -> int:
        """Where the base / EMA history pass starts: the first decoder layer that can differ from the trained model's
        (`first_changed_layer`: LoRA on the later layers only), or 0 (the whole model) when that is layer 0, the
        history is another model (a frozen copy), or `history_from_first_adapted_layer` is off."""
        if self._history_start is None:
            args = self.args
            usable = (args.token_scorer == "sstoken" and args.history_model in ("base", "ema")
                      and self.frozen is None and args.history_from_first_adapted_layer)
            self._history_start = first_changed_layer(self.accelerator.unwrap_model(model)) if usable else 0
        return self._history_start

    def _check_history_start(self, model, inputs, history_loss) -> torch.Tensor:
        """On the first batch, the history from layer `start` against the full history pass: the two are the same
        computation, so a difference means this architecture does not fit `decoder_from_layer` (e.g. dropout in the
        early layers in training mode); then the full pass is used from here on."""
        self._history_start_checked = True
        full = self._history_loss(model, inputs)
        if torch.allclose(history_loss, full, atol=1e-4, rtol=1e-4):
            return history_loss
        logger.warning(f"ssToken history from decoder layer {self._history_start} differs from the full history pass "
                       f"(max |diff| {(history_loss - full).abs().max().item():.2e}); using the full pass")
        self._history_start = 0
        return full

    def _decoder(self, model):
        base = self.accelerator.unwrap_model(model)
        if hasattr(base, "get_base_model"):
            base = base.get_base_model()
        return base.get_decoder()

    def _reference_logprobs(self, model, inputs, mask) -> torch.Tensor:
        if "reference_input_ids" not in inputs:
            return self._base_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        ref = self._base_logprobs(model, inputs["reference_input_ids"], inputs["reference_attention_mask"],
                                  inputs["reference_labels"])
        return realign_reference(ref, inputs["reference_labels"], mask)

    def _attention_layer(self, model):
        return self._decoder(model).layers[self.args.attention_layer].self_attn

    def _gamma_warmup_steps(self) -> int:
        value = self.args.gamma_warmup_steps
        return math.ceil(value * self.state.max_steps) if value < 1 else int(value)

    def _token_columns(self) -> list[str]:
        """The per-token columns the batches carry: the configuration's, and the ground truth where the data has it."""
        return self.args.token_columns() + ([KINDS_COLUMN] if self._ground_truth else [])

    @staticmethod
    def _selection_quality(scores, weights, kinds, mask) -> dict[str, torch.Tensor]:
        """Sums for the ground-truth metrics; the same keys on every rank and step (they are gathered together)."""
        quality = selection_quality(scores, weights, kinds, mask)
        stats = {}
        for kind in KINDS:
            tokens = quality.get(f"tokens_{kind}", 0.0)
            stats[f"truth_tokens_{kind}"] = torch.tensor(tokens)
            stats[f"truth_kept_{kind}"] = torch.tensor(quality.get(f"kept_{kind}", 0.0) * tokens)
            stats[f"truth_weight_{kind}"] = torch.tensor(quality.get(f"weight_{kind}", 0.0) * tokens)
        for kind in NOISE_KINDS:
            value = quality.get(f"auroc_clean_vs_{kind}")
            stats[f"truth_auroc_{kind}"] = torch.tensor(0.0 if value is None else value)
            stats[f"truth_auroc_n_{kind}"] = torch.tensor(0.0 if value is None else 1.0)
        return stats

    # --- the loss ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        extra_keys = self._token_columns() + ["reference_input_ids", "reference_attention_mask", "reference_labels"]
        extras = {k: inputs.pop(k) for k in extra_keys if k in inputs}
        labels = inputs["labels"]
        mask = labels[:, 1:] != -100
        scorer = args.token_scorer
        stats: dict[str, torch.Tensor] = {}

        # Passes that do not depend on the current weights' gradients, before the main forward (a history that
        # starts at a later layer needs the main forward's hidden state there, so it runs after it).
        start = self._history_start_layer(model) if scorer == "sstoken" else 0
        if scorer == "sstoken" and not start:
            history_loss = self._history_loss(model, {**inputs, **extras})
        elif scorer in ("rho1", "prior"):
            reference_logprobs = self._reference_logprobs(model, {**inputs, **extras}, mask)

        with ExitStack() as stack:
            captured = stack.enter_context(capture_attention_inputs(self._attention_layer(model))) \
                if scorer == "sstoken" else {}
            at_start = stack.enter_context(capture_attention_inputs(self._decoder(model).layers[start])) \
                if start else {}
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        token_loss = -outputs.log_probs  # [B, T-1], 0 where the label is -100
        current = token_loss.detach().float()
        if start:
            history_loss = self._history_loss(model, {**inputs, **extras}, start, at_start["hidden_states"].detach())
            if not self._history_start_checked:
                history_loss = self._check_history_start(model, {**inputs, **extras}, history_loss)

        if scorer == "sstoken":
            prompt = (labels == -100) & inputs["attention_mask"].bool()
            # Only the rows that score a response token: from the first label position of the batch on (its own row
            # is one further with attention_row "own").
            first_label = int(mask.any(dim=0).nonzero()[0]) if mask.any() else labels.shape[1]
            attention = attention_to_prompt(self._attention_layer(model), captured["hidden_states"],
                                            captured["position_embeddings"], prompt, inputs["attention_mask"],
                                            sink_tokens=args.attention_sink_tokens, first_row=first_label)
            attention = attention_per_label(attention, args.attention_row)
            gamma = 0.0 if self.state.global_step < self._gamma_warmup_steps() else args.gamma
            scores = sstoken_score(history_loss, current, attention, mask, gamma)
            weights = select_top_share(scores, mask, args.select_ratio, args.selection_level).float()  # sstoken_select
            stats["rel_sum"] = ((history_loss - current) * mask).sum()
            stats["attention_sum"] = (attention * mask).sum()
        elif scorer == "rho1":
            scores = current + reference_logprobs  # excess loss L_cur - L_ref
            weights = excess_loss_select(current, -reference_logprobs, mask, args.select_ratio).float()
        elif scorer == "random":
            scores = random_scores(mask, torch.Generator().manual_seed(self._rng.getrandbits(63)))
            weights = select_top_share(scores, mask, args.select_ratio, args.selection_level).float()
        elif scorer == "prior":
            weights = prior_weights(reference_logprobs, mask, args.prior_alpha)
        elif scorer == "column":
            weights = extras[args.token_weights_column][:, 1:].float() * mask
        elif scorer == "dft":
            weights = dft_weights(outputs.log_probs, mask)
        else:
            weights = mask.float()
        if scorer not in ("sstoken", "rho1", "random"):
            scores = weights  # a weighting's score is its weight
        if KINDS_COLUMN in extras:
            stats.update(self._selection_quality(scores, weights, extras[KINDS_COLUMN][:, 1:].long(), mask))

        normaliser = num_items_in_batch if num_items_in_batch is not None else self._local_normaliser(
            {"labels": labels, **extras})
        loss = (weights.to(token_loss.dtype) * token_loss).sum() / torch.as_tensor(normaliser).clamp(min=1e-8)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks; Z already spans them

        kept = (weights > 0) & mask
        stats.update(
            tokens=mask.sum(), kept=kept.sum(), weight_sum=weights.sum(), weight_sq_sum=(weights**2).sum(),
            loss_all_sum=(current * mask).sum(), loss_kept_sum=(current * kept).sum(),
        )
        self._record(mode, stats)
        return (loss, outputs) if return_outputs else loss

    def _record(self, mode: str, stats: dict[str, torch.Tensor]) -> None:
        """Token statistics summed over ranks, as TRL keeps its metrics (averaged over log steps by SFTTrainer.log)."""
        names = list(stats)
        totals = self.accelerator.gather_for_metrics(
            torch.stack([torch.as_tensor(stats[n], dtype=torch.float64, device=self.args.device) for n in names])[None]
        ).sum(0)
        s = dict(zip(names, totals.tolist()))
        tokens, kept = max(s["tokens"], 1.0), max(s["kept"], 1.0)
        metrics = self._metrics[mode]
        metrics["kept_fraction"].append(s["kept"] / tokens)
        metrics["loss_all_tokens"].append(s["loss_all_sum"] / tokens)
        metrics["loss_kept_tokens"].append(s["loss_kept_sum"] / kept)
        mean = s["weight_sum"] / tokens
        metrics["weight_mean"].append(mean)
        metrics["weight_std"].append(max(s["weight_sq_sum"] / tokens - mean**2, 0.0) ** 0.5)
        if "rel_sum" in s:
            metrics["rel_mean"].append(s["rel_sum"] / tokens)
            metrics["attention_mean"].append(s["attention_sum"] / tokens)
            age = self.state.global_step - (self.ema.updated_at if self.ema is not None else 0)
            if self.args.history_model != "offline":
                metrics["history_age"].append(float(age))
        # Selection against the data's ground truth: per kind the kept share and mean weight, and the AUROC of the
        # score for clean vs each noise kind (a micro-batch's AUROC, averaged; selectors/selection_quality.py).
        for kind in KINDS if "truth_tokens_clean" in s else ():
            if s[f"truth_tokens_{kind}"] > 0:
                metrics[f"truth_kept_{kind}"].append(s[f"truth_kept_{kind}"] / s[f"truth_tokens_{kind}"])
                metrics[f"truth_weight_{kind}"].append(s[f"truth_weight_{kind}"] / s[f"truth_tokens_{kind}"])
        for kind in NOISE_KINDS if "truth_tokens_clean" in s else ():
            if s[f"truth_auroc_n_{kind}"] > 0:
                metrics[f"truth_auroc_clean_vs_{kind}"].append(s[f"truth_auroc_{kind}"] / s[f"truth_auroc_n_{kind}"])

    # --- checkpoints -------------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        if self.ema is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.ema.save(folder)  # before the trainer state, so a checkpoint that looks complete has it
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.ema is not None and resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
            if folder:
                self.ema.load(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)
