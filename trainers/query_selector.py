"""Query-selector training: a frozen LM answers from the context tokens a trainable QuerySelector keeps.

Each example is a context, a query and an answer (columns `context`/`query`/`completion`, or a prompt/completion
row whose prompt is cut at the last `query_separator`). Per batch: LM features of [context; query] from the first
`feature_layer` layers (no grad) -> the selector keeps a subset of the context (straight-through) -> the LM reads
[kept context embeddings; query; answer] and the loss is the answer's CE (summed, divided by the answer-token count
of the global batch) + the budget terms (learned budget only; per-micro-batch means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from trl import SFTConfig, SFTTrainer

from tokensieve.errors import DataError, ModelError, check_values
from tokensieve.files import base_model_record, read_export_config, read_export_weights, write_export
from tokensieve.selectors.keep_attention import KEEP_ATTENTION
from tokensieve.selectors.query_selector import QuerySelector, promptdistill_scores
from tokensieve.trainers.base import ConfigDefaults, SmallModuleTrainer, TrainerBase
from tokensieve.trainers.guards import FiniteLossMixin
from tokensieve.trainers.selector_lm import _base, check_selector_lengths, lm_features, reduced_inputs, split_prompt

SELECTOR_FILE = "selector.safetensors"
SELECTOR_CONFIG = "selector.json"
FORMAT = "tokensieve-query-selector"


@dataclass
class QuerySelectorConfig(ConfigDefaults, SFTConfig):
    """SFTConfig plus the selector's architecture, budget and loss options (defaults from docs/methods.md s.5)."""

    query_separator: str = field(default=" ?", metadata={"help": "Rows without context/query columns: the query "
                                                                 "starts at the prompt's last occurrence of this."})
    feature_layer: int = field(default=1, metadata={"help": "LM layers run (no grad) to get the scoring features."})
    selector_heads: int = field(default=4, metadata={"help": "Heads of the scorer's cross-attention."})
    budget_hidden: int = field(default=256, metadata={"help": "Width of the budget head's MLP."})
    rho_min: float = field(default=0.05, metadata={"help": "Smallest keep ratio the budget head predicts."})
    rho_max: float = field(default=0.5, metadata={"help": "Largest keep ratio the budget head predicts."})
    max_kept_tokens: int | None = field(default=None, metadata={"help": "n_max: cap on kept tokens (default: N)."})
    selector_tau: float = field(default=0.1, metadata={"help": "Temperature of the soft threshold / Gumbel mask."})
    selector_pool: int = field(default=1, metadata={"help": "Average the selector's relevance over this many "
                                                             "neighbouring context tokens (odd; 1: off) before "
                                                             "choosing, in training and at inference, as PromptDistill "
                                                             "smooths its scores (kernel 5)."})
    gumbel: bool = field(default=True, metadata={"help": "Gumbel straight-through (else plain STE)."})
    fixed_keep_ratio: float | None = field(
        default=None, metadata={"help": "Train for a fixed share of the context instead of the learned budget."}
    )
    keep_ratio_start: float | None = field(
        default=None, metadata={"help": "With fixed_keep_ratio: start training at this larger share and lower it "
                                        "linearly to fixed_keep_ratio over keep_ratio_anneal_steps (a selector "
                                        "trained at a small share from the start rarely keeps what helps)."}
    )
    keep_ratio_anneal_steps: int = field(default=0, metadata={"help": "Steps of the keep_ratio_start anneal."})
    lambda_t: float = field(default=1.0, metadata={"help": "Weight of (rho N)^2 / n_max^2."})
    lambda_m: float = field(default=1.7, metadata={"help": "Weight of rho N / n_max."})
    lambda_s: float = field(default=0.05, metadata={"help": "Weight of (rho - running mean)^2."})
    train_lora: bool = field(default=False, metadata={"help": "Also train LoRA adapters, if the model has them."})
    attention_distill_weight: float = field(
        default=0.0, metadata={"help": "Weight of KL(t || r / sum r): t = softmax of the LM's own PromptDistill-"
                                       "style scores of the context at the feature layer (q_last . k, head mean, "
                                       "pooled), r = the selector's relevance. 0: off (answer loss only)."}
    )
    attention_distill_layer: int | None = field(
        default=None, metadata={"help": "The LM layer whose scores are the attention_distill teacher (default: "
                                        "feature_layer). A later layer than feature_layer trains the selector, "
                                        "which reads the features entering feature_layer, to pick what that layer "
                                        "would: training runs the frozen LM through it, inference only through "
                                        "feature_layer."}
    )
    answer_eos: bool = field(
        default=False, metadata={"help": "Append EOS to each answer. Off by default: a frozen LM that does not end "
                                         "its answers with EOS would add a loss no selection can lower."}
    )
    training_selection: str = field(
        default="mask", metadata={"help": "How the LM sees the selection in training. mask: every context token "
                                          "stays in the forward and attention weighs each key by its straight-"
                                          "through keep value (the same forward as removing the dropped tokens, "
                                          "but they get gradients too); drop: only the kept tokens go in (only "
                                          "they get gradients). Inference always removes the dropped tokens."}
    )

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.feature_layer >= 1, "feature_layer", ">= 1", self.feature_layer),
            (0.0 < self.rho_min <= self.rho_max <= 1.0, "rho_min/rho_max", "0 < rho_min <= rho_max <= 1",
             (self.rho_min, self.rho_max)),
            (self.selector_tau > 0, "selector_tau", "> 0", self.selector_tau),
            (self.selector_pool >= 1 and self.selector_pool % 2 == 1, "selector_pool", "an odd number >= 1",
             self.selector_pool),
            (self.attention_distill_weight >= 0, "attention_distill_weight", ">= 0", self.attention_distill_weight),
            (self.attention_distill_layer is None or self.attention_distill_layer >= self.feature_layer,
             "attention_distill_layer", ">= feature_layer", self.attention_distill_layer),
            (self.fixed_keep_ratio is None or 0 < self.fixed_keep_ratio <= 1, "fixed_keep_ratio", "in (0, 1]",
             self.fixed_keep_ratio),
            (self.keep_ratio_start is None or (self.fixed_keep_ratio is not None and
                                               self.fixed_keep_ratio <= self.keep_ratio_start <= 1),
             "keep_ratio_start", "in [fixed_keep_ratio, 1] (and needs fixed_keep_ratio)", self.keep_ratio_start),
            (self.max_kept_tokens is None or self.max_kept_tokens >= 1, "max_kept_tokens", ">= 1", self.max_kept_tokens),
            (not self.packing, "packing", "false", self.packing),
            (self.training_selection in ("mask", "drop"), "training_selection", "'mask' or 'drop'",
             self.training_selection),
        ]
        check_values(checks)

    def selector_kwargs(self, hidden_size: int) -> dict:
        return dict(hidden_size=hidden_size, num_heads=self.selector_heads, budget_hidden=self.budget_hidden,
                    rho_min=self.rho_min, rho_max=self.rho_max, n_max=self.max_kept_tokens, tau=self.selector_tau,
                    gumbel=self.gumbel, pool=self.selector_pool)


def attach_selector(model, selector: QuerySelector) -> QuerySelector:
    """Make the selector a submodule of the LM, so it trains, moves and checkpoints with it."""
    _base(model).query_selector = selector.to(next(model.parameters()).device)
    return selector


def encode_rows(dataset, tokenizer, separator: str, dataset_name: str, answer_eos: bool = False,
                max_length: int | None = None):
    """context_ids / query_ids / answer_ids (answer, + EOS if asked) from context/query/completion or
    prompt/completion. An empty context, or a query + answer that leave no room for context within `max_length`
    tokens, is a DataError naming the example."""
    columns = dataset.column_names
    if "completion" not in columns or not ({"context", "query"} <= set(columns) or "prompt" in columns):
        raise DataError(f"{dataset_name} dataset: a query selector needs columns context, query and completion "
                        f"(or prompt and completion); got {', '.join(columns)}")

    def encode(batch, indices):
        contexts, queries = [], []
        for i in range(len(batch["completion"])):
            if "context" in batch and "query" in batch:
                context, query = batch["context"][i], batch["query"][i]
            else:
                try:
                    context, query = split_prompt(batch["prompt"][i], separator)
                except ValueError as error:
                    raise DataError(f"{dataset_name} dataset, a row starting {batch['prompt'][i][:40]!r}: "
                                    f"{error} (query_separator)") from None
            contexts.append(context)
            queries.append(query)
        answers = [c + tokenizer.eos_token if answer_eos else c for c in batch["completion"]]
        encode_text = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        out = {"context_ids": encode_text(contexts), "query_ids": encode_text(queries),
               "answer_ids": encode_text(answers)}
        for index, context, query, answer in zip(indices, out["context_ids"], out["query_ids"], out["answer_ids"]):
            check_selector_lengths(f"{dataset_name} dataset, example {index}", len(context), len(query) + len(answer),
                                   max_length, "max_length")
        return out

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=columns,
                       desc=f"Encoding {dataset_name} contexts")


class SelectorCollator:
    """Right-pads context, query and answer ids; `labels` ([-100] + answer) lets the Trainer count answer tokens."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        batch = {}
        for key in ("context_ids", "query_ids", "answer_ids"):
            rows = [torch.tensor(e[key], dtype=torch.long) for e in examples]
            batch[key] = pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
            batch[key.replace("_ids", "_mask")] = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        labels = [torch.tensor([-100] + e["answer_ids"], dtype=torch.long) for e in examples]
        batch["labels"] = pad_sequence(labels, batch_first=True, padding_value=-100)
        return batch


def key_keep_vector(keep: torch.Tensor, context_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, W] keep values for `reduced_inputs` rows that hold every context token (right-padded): the selector's
    (straight-through) keep on the context, 1 on the query, the answer and padding (the attention mask hides it)."""
    out = torch.ones(attention_mask.shape, dtype=keep.dtype, device=keep.device)
    for b, length in enumerate(context_mask.sum(-1).tolist()):
        out[b, :length] = keep[b, :length]
    return out


class QuerySelectorTrainer(SmallModuleTrainer, TrainerBase, FiniteLossMixin, SFTTrainer):
    """Trains a QuerySelector in front of a frozen LM (see the module docstring)."""

    _tag_names = ["trl", "sft", "tokensieve", "query-selector"]
    loss_is_scaled_for_ga = True
    module_marker, module_file = "query_selector", SELECTOR_FILE

    def __init__(self, model, args: QuerySelectorConfig, *rest, **kwargs):
        base = _base(model)
        depth = len(base.get_decoder().layers)
        for key in ("feature_layer", "attention_distill_layer"):
            value = getattr(args, key)
            if value is not None and value >= depth:
                raise ModelError(f"{key} is {value}, but the model has {depth} decoder layers (0 .. {depth - 1})")
        if not hasattr(base, "query_selector"):
            attach_selector(model, QuerySelector(**args.selector_kwargs(base.config.get_text_config().hidden_size)))
        self.freeze_all_but_module(model, args.train_lora)
        if args.training_selection == "mask":
            model.set_attn_implementation(KEEP_ATTENTION)  # sdpa unless a forward passes `key_keep`
        super().__init__(model, args, *rest, **kwargs)
        self.data_collator = SelectorCollator(self.processing_class.pad_token_id)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        return encode_rows(dataset, processing_class, args.query_separator, dataset_name, args.answer_eos,
                           args.max_length)

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["context_ids", "query_ids", "answer_ids"]

    @property
    def selector(self) -> QuerySelector:
        return _base(self.accelerator.unwrap_model(self.model)).query_selector

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        selector = self.selector
        unwrapped = self.accelerator.unwrap_model(model)
        teacher_layer = args.attention_distill_layer if args.attention_distill_weight > 0 else None
        features = lm_features(unwrapped, inputs["context_ids"], inputs["context_mask"], inputs["query_ids"],
                               inputs["query_mask"], args.feature_layer, teacher_layer)
        selection = selector(features.context.float(), inputs["context_mask"], features.query.float(),
                             inputs["query_mask"], ratio=self.keep_ratio(mode))
        keep = selection.keep if selector.training else selection.keep.float()
        masked = args.training_selection == "mask"  # every context token goes in; attention weighs them by keep
        lm_inputs = reduced_inputs(unwrapped, inputs["context_ids"], inputs["context_mask"],
                                   inputs["context_mask"].bool() if masked else keep, inputs["query_ids"],
                                   inputs["query_mask"], inputs["answer_ids"], inputs["answer_mask"])
        if masked:
            lm_inputs["key_keep"] = key_keep_vector(keep, inputs["context_mask"], lm_inputs["attention_mask"])
        labels = lm_inputs.pop("labels")
        logits = model(**lm_inputs, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none") * (targets != -100)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        loss = ce.sum() / torch.as_tensor(count).clamp(min=1)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        terms = {}
        if args.fixed_keep_ratio is None:
            terms = selector.budget_terms(selection, inputs["context_mask"], args.lambda_t, args.lambda_m, args.lambda_s)
        if args.attention_distill_weight > 0:
            terms["attention_distill"] = args.attention_distill_weight * attention_distill_loss(
                features, selection.scores, inputs["context_mask"])
        if terms:
            # Set by the training loop; a compute_loss outside it (a first-batch check) sees the configured count.
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            steps = steps if mode == "train" else 1
            loss = loss + sum(terms.values()) / steps
        self._record(mode, ce, targets, selection, inputs["context_mask"], terms)
        return (loss, None) if return_outputs else loss

    def keep_ratio(self, mode: str) -> float | None:
        """The fixed share kept at this step (None: the learned budget); annealed in training if asked."""
        args = self.args
        if args.keep_ratio_start is None or mode != "train":
            return args.fixed_keep_ratio
        progress = min(self.state.global_step / max(args.keep_ratio_anneal_steps, 1), 1.0)
        return args.keep_ratio_start + (args.fixed_keep_ratio - args.keep_ratio_start) * progress

    @torch.no_grad()
    def _record(self, mode, ce, targets, selection, context_mask, terms) -> None:
        stats = {
            "answer_ce": ce.sum() / (targets != -100).sum().clamp(min=1),
            "kept_fraction": (selection.count / context_mask.sum(-1).clamp(min=1)).mean(),
            "kept_tokens": selection.count.float().mean(),
            "rho_mean": selection.rho.detach().mean(),
            **{k: v.detach() for k, v in terms.items()},
        }
        self.log_means(mode, stats)

    def save_module(self, unwrapped, folder) -> None:
        save_selector(unwrapped, folder, self.args)

    def load_module(self, unwrapped, folder) -> None:
        load_selector_weights(_base(unwrapped).query_selector, folder)


# --- export ------------------------------------------------------------------------------------------------------


def attention_distill_loss(features, scores: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(t || r / sum r), t = softmax over the context of the LM's PromptDistill-style scores."""
    mask = context_mask.bool()
    teacher = promptdistill_scores(features.q_last, features.context_keys, mask).softmax(-1)  # 0 on padding
    student = scores / scores.sum(-1, keepdim=True).clamp(min=1e-8)
    kl = teacher * (teacher.clamp(min=1e-12).log() - student.clamp(min=1e-12).log())
    return kl.masked_fill(~mask, 0.0).sum(-1).mean()


def save_selector(model, output_dir, args: QuerySelectorConfig) -> Path:
    """selector.safetensors + selector.json (the selector's config, feature layer, separator, base model)."""
    base = _base(model)
    config = {"format": FORMAT, "version": 1, "selector": base.query_selector.config,
              "feature_layer": args.feature_layer, "query_separator": args.query_separator,
              "fixed_keep_ratio": args.fixed_keep_ratio, "architecture": base.config.model_type,
              **base_model_record(base.config)}
    state = {k: v.detach().cpu().contiguous() for k, v in base.query_selector.state_dict().items()}
    return write_export(output_dir, SELECTOR_FILE, state, SELECTOR_CONFIG, config)


def read_selector_config(path) -> dict:
    return read_export_config(path, SELECTOR_CONFIG, FORMAT, "query-selector")


def load_selector_weights(selector: QuerySelector, path) -> None:
    state = read_export_weights(path, SELECTOR_FILE, "selector")
    try:
        selector.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelError(f"{Path(path) / SELECTOR_FILE}: does not fit the selector in {SELECTOR_CONFIG}: "
                         f"{str(error)[:300]}") from None
