"""TRIM-KV gate training: distillation from the same model with gates off, plus the capacity loss (docs/methods.md s.4).

    loss = 1/2 (CE + KL(p_teacher || q_student)) over response tokens  +  lambda * capacity_loss(log beta, M)

The teacher is the model itself under `gates_disabled` and no_grad, so no second copy of the weights exists (with
`train_lora`, its adapters are off in the teacher's forward too).
Only the gates train (LoRA adapters too with `train_lora`). The CE + KL part is summed over tokens and divided by
the response-token count of the whole accumulated global batch; the capacity loss is a per-micro-batch mean over
the positive terms of all ranks, divided by the accumulation steps.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from tokensieve.errors import ModelError, check_values
from tokensieve.selectors.attention import (TRAINING_KERNELS, attach_gates, attention_modules, collected_log_beta,
                                            gates_disabled, set_training_kernel, train_with_eviction)
from tokensieve.selectors.gate_io import (GATES_FILE, check_compatible, load_gate_weights, load_gates,
                                          read_gates_config, save_gates)
from tokensieve.selectors.kv_cache import ATTENTIONS, DEFAULT_BUFFER
from tokensieve.selectors.retention import capacity_terms
from tokensieve.trainers.base import CompletionLabels, ConfigDefaults, SmallModuleTrainer, TrainerBase
from tokensieve.trainers.guards import FiniteLossMixin, check_finite
from tokensieve.trainers.layer_metrics import LayerMetrics


@dataclass
class RetentionConfig(ConfigDefaults, CompletionLabels, SFTConfig):
    """SFTConfig plus the retention-gate options; defaults from the TRIM-KV training script (docs/methods.md)."""

    memory_size: int = field(default=512, metadata={"help": "M: the KV budget per (layer, kv head) the capacity loss aims at."})
    buffer_size: int = field(default=DEFAULT_BUFFER, metadata={"help": "Inference: tokens added between evictions (saved in the export)."})
    inference_attention: str = field(
        default="plain",
        metadata={"help": "How a bounded cache built from the export attends to the tokens it kept (saved in the "
                          "export; `tokensieve eval/generate --attention` overrides it): 'plain', as in the paper, "
                          "or 'decayed', with the training bias (t - pos) log beta, so a larger cache reads like the "
                          "soft-trained model (not in the paper)."},
    )
    capacity_weight: float = field(default=1.0, metadata={"help": "lambda, the weight of the capacity loss."})
    global_budget: bool = field(
        default=False, metadata={"help": "One budget of M * layers * heads shared by all heads instead of M per head."}
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Temperature of the KL(teacher || student) term."})
    gate_intermediate_size: int = field(default=512, metadata={"help": "Hidden width of each gate's MLP."})
    gate_bias_init: float = field(default=18.0, metadata={"help": "Initial gate bias: beta ~ sigmoid(18) ~ 1."})
    train_lora: bool = field(default=False, metadata={"help": "Also train LoRA adapters, if the model has them."})
    capacity_chunk_size: int = field(default=1024, metadata={"help": "Query rows per chunk of the capacity loss "
                                                                    "(memory ~ 2 sqrt(chunk) x T per head)."})
    init_gates: str | None = field(
        default=None,
        metadata={"help": "A gate export (gates.safetensors + gates.json) to start from instead of fresh gates, e.g. "
                          "soft-trained gates that a train_with_eviction stage then fine-tunes (the gates only: a "
                          "LoRA adapter next to them is not loaded)."},
    )
    train_with_eviction: bool = field(
        default=False,
        metadata={"help": "Not in the paper: the student attends only to the memory_size keys per query and kv head "
                          "that a RetentionCache would keep, gradients through the soft bias (straight-through)."},
    )
    training_attention: str = field(
        default="fused",
        metadata={"help": "How the gated attention is computed in training (same result up to rounding): 'fused' (the "
                          "bias folded into two extra head dimensions of one sdpa call: fused kernels, memory linear "
                          "in the length; any device), 'chunked' (query rows in blocks, explicit fp32 attention; any "
                          "device), 'flex' (FlexAttention, the bias as a score_mod, compiled; CUDA only: FlexAttention "
                          "has no backward pass on CPU), 'dense' (the whole [B, H, T, T] bias: the reference, memory "
                          "quadratic in the length)."},
    )
    retention_map_steps: int = field(
        default=0,
        metadata={"help": "Every N optimizer steps, the retention map (tokens x layers/heads, kept or evicted at M + "
                          "buffer, coloured by beta) of the first row of retention_map_data: a PNG in "
                          "output_dir/retention_maps and an image in W&B. 0: never."},
    )
    retention_map_data: str | None = field(
        default=None, metadata={"help": "A JSONL file of mqar, needle-qa or real-prose retrieval rows (with their "
                                        "ground-truth fields) for retention_map_steps."},
    )
    training_attention_chunk: int = field(default=128, metadata={"help": "Query rows per block of the chunked "
                                                                          "attention and of train_with_eviction's "
                                                                          "evicted forward."})

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.memory_size >= 1, "memory_size", ">= 1", self.memory_size),
            (self.training_attention in TRAINING_KERNELS, "training_attention", f"one of {', '.join(TRAINING_KERNELS)}",
             self.training_attention),
            (self.training_attention_chunk >= 1, "training_attention_chunk", ">= 1", self.training_attention_chunk),
            (self.retention_map_steps >= 0, "retention_map_steps", ">= 0", self.retention_map_steps),
            (not self.retention_map_steps or (self.retention_map_data and os.path.isfile(self.retention_map_data)),
             "retention_map_data", "a JSONL file of mqar, needle-qa or real-prose retrieval rows when "
             "retention_map_steps > 0",
             self.retention_map_data),
            (self.buffer_size >= 1, "buffer_size", ">= 1", self.buffer_size),
            (self.inference_attention in ATTENTIONS, "inference_attention", f"one of {', '.join(ATTENTIONS)}",
             self.inference_attention),
            (self.capacity_weight >= 0, "capacity_weight", ">= 0", self.capacity_weight),
            (self.distill_temperature > 0, "distill_temperature", "> 0", self.distill_temperature),
            (self.gate_intermediate_size >= 1, "gate_intermediate_size", ">= 1", self.gate_intermediate_size),
            (not self.packing, "packing", "false (the capacity loss needs one sequence per row)", self.packing),
        ]
        check_values(checks)


EOS_PROBABILITY_FLOOR = 0.05  # below it, the teacher cannot produce the end-of-sequence label (see the warning)
logger = logging.get_logger(__name__)


class RetentionTrainer(LayerMetrics, SmallModuleTrainer, TrainerBase, FiniteLossMixin, SFTTrainer):
    """Trains TRIM-KV retention gates on a frozen model (see the module docstring)."""

    _tag_names = ["trl", "sft", "tokensieve", "trim-kv"]
    loss_is_scaled_for_ga = True
    module_marker, module_file = "retention_gate", GATES_FILE

    def __init__(self, model, args: RetentionConfig, *rest, **kwargs):
        if args.init_gates is not None:
            try:
                if hasattr(attention_modules(model)[0], "retention_gate"):
                    check_compatible(model, read_gates_config(args.init_gates), args.init_gates)
                    load_gate_weights(model, args.init_gates)
                else:
                    load_gates(model, args.init_gates)
            except ModelError as error:
                raise ModelError(f"init_gates: {error}") from None
        elif not hasattr(attention_modules(model)[0], "retention_gate"):
            attach_gates(model, args.gate_intermediate_size, args.gate_bias_init)
        train_with_eviction(model, args.memory_size if args.train_with_eviction else None)
        set_training_kernel(model, args.training_attention, args.training_attention_chunk)
        self.freeze_all_but_module(model, args.train_lora)
        super().__init__(model, args, *rest, **kwargs)
        self._eos_checked = False
        if args.retention_map_steps:
            from tokensieve.trainers.retention_map import RetentionMapCallback

            with open(args.retention_map_data, encoding="utf-8") as rows:
                first = json.loads(rows.readline())
            self.add_callback(RetentionMapCallback(self, first, args.retention_map_steps))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        # Logits only where the next token is a response token: [n, V] rather than [B, T, V] (transformers slices
        # the hidden states with a boolean `logits_to_keep` before the LM head).
        scored = torch.zeros_like(labels, dtype=torch.bool)
        scored[:, :-1] = labels[:, 1:] != -100
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"),
                        "use_cache": False, "logits_to_keep": scored}
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), gates_disabled(unwrapped), self._adapters_off_if_trained(unwrapped):
            teacher = model(**model_inputs).logits.float()
        student = model(**model_inputs).logits.float()
        log_beta = collected_log_beta(unwrapped)  # [B, layers * H_kv, T]
        check_finite(log_beta, "a retention gate's output (log beta)", self.state.global_step + 1, args.output_dir)

        targets = labels[:, 1:][scored[:, :-1]]
        if mode == "train" and not self._eos_checked:
            self._eos_checked = True
            self._warn_if_eos_unpredicted(teacher, targets)
        ce = -student.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        tau = args.distill_temperature
        kl = F.kl_div((student / tau).log_softmax(-1), (teacher / tau).log_softmax(-1), log_target=True,
                      reduction="none").sum(-1) * tau**2
        count = num_items_in_batch if num_items_in_batch is not None else ce.numel()
        quality = 0.5 * (ce + kl).sum() / torch.as_tensor(count).clamp(min=1)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            quality = quality * self.accelerator.num_processes  # DDP averages gradients; the count spans ranks

        real = inputs.get("attention_mask")  # padding neither counts as retained nor adds capacity terms
        total, count = capacity_terms(log_beta, args.memory_size, args.global_budget, args.capacity_chunk_size, real)
        if self.accelerator.num_processes > 1:
            # Divide by the positive terms of every rank: 2 ranks x batch b then equal 1 rank x batch 2b.
            count = self.accelerator.reduce(count.detach().float(), "sum")
            total = total * self.accelerator.num_processes  # DDP averages the gradients over ranks
        capacity = total / count.clamp(min=1)
        # Set by the training loop; a compute_loss outside it (a first-batch check) sees the configured count.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        steps = steps if mode == "train" else 1
        loss = quality + args.capacity_weight * capacity / steps
        self._record(mode, ce, kl, capacity, log_beta.detach(), real)
        return (loss, None) if return_outputs else loss

    def _warn_if_eos_unpredicted(self, teacher: torch.Tensor, targets: torch.Tensor) -> None:
        """A loss target the frozen model cannot produce (e.g. the end-of-sequence label TRL appends to every
        completion, for a model never taught to predict it there) says nothing about retention, yet its CE can
        dominate the loss, and the gates then learn to raise it. Warn on the first batch if so."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        eos = getattr(tokenizer, "eos_token_id", None)
        at_eos = targets == eos
        if not self.args.eos_loss or eos is None or not bool(at_eos.any()):
            return
        probability = teacher[at_eos].softmax(-1)[:, eos].mean().item()
        if probability < EOS_PROBABILITY_FLOOR:
            logger.warning(
                f"the frozen model gives the end-of-sequence label appended to each completion a mean probability of "
                f"{probability:.4f} on the first batch ({float(at_eos.float().mean()):.0%} of the scored tokens): a "
                f"target it cannot produce carries no signal about retention but can dominate the loss. Set "
                f"eos_loss: false to leave that label out.")

    def _adapters_off_if_trained(self, unwrapped):
        """The teacher is the model as it was: LoRA adapters that train with the gates are off in its forward."""
        if self.args.train_lora and hasattr(unwrapped, "disable_adapter"):
            return unwrapped.disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def _record(self, mode, ce, kl, capacity, log_beta, real) -> None:
        """ce and kl: one entry per scored (response) token."""
        args = self.args
        tokens = max(ce.numel(), 1)
        beta = log_beta.exp()
        layers = len(attention_modules(self.accelerator.unwrap_model(self.model)))
        valid = torch.ones_like(beta, dtype=torch.bool) if real is None else real.bool()[:, None, :].expand_as(beta)
        # Retention of every token at the end of its sequence: beta_i^(T_real - 1 - i).
        length = valid.sum(-1, keepdim=True)
        age = (length - 1 - torch.arange(beta.shape[-1], device=beta.device)).clamp(min=0)
        final = torch.exp(age * log_beta)
        expected = (final * valid).sum(-1)  # S at the last real token, per (batch, layer-head)
        stats = {
            "ce": ce.sum() / tokens, "kl": kl.sum() / tokens, "capacity_loss": capacity,
            "retained_over_memory": (expected / args.memory_size).mean(),
            "beta_mean": beta[valid].mean(),
            "forgotten_fraction": ((final < 0.01) & valid).sum() / valid.sum().clamp(min=1),
        }
        per_layer = beta.masked_fill(~valid, 0).view(beta.shape[0], layers, -1, beta.shape[-1])
        per_layer = per_layer.sum(dim=(0, 2, 3)) / valid.view_as(per_layer).sum(dim=(0, 2, 3)).clamp(min=1)
        self.log_means(mode, stats)
        self.log_layer_means(mode, "beta_mean", per_layer)  # the console shows its min and max, W&B every layer

    # --- export ----------------------------------------------------------------------------------------------------

    def save_module(self, unwrapped, folder) -> None:
        save_gates(unwrapped, folder, memory_size=self.args.memory_size, buffer_size=self.args.buffer_size,
                   attention=self.args.inference_attention)

    def load_module(self, unwrapped, folder) -> None:
        load_gate_weights(unwrapped, folder)
