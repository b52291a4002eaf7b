"""History and reference models for token scoring: the EMA of the trainable parameters, frozen copies, loaded models.

Every scoring pass runs under no_grad in eval mode and returns per-token log-probabilities [B, T-1] aligned with
labels[:, 1:] (TRL's fused LM head, so no [B, T, V] logits are built).
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from trl.trainer.utils import add_fused_lm_head

from tokensieve.errors import ModelError
from tokensieve.selectors.token_scores import eval_mode, token_logprobs  # noqa: F401 (importable from here)

EMA_FILE = "history_ema.safetensors"


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` as it is now (the `base` history model of full fine-tuning: costs one more copy)."""
    twin = copy.deepcopy(model)
    twin.__dict__.pop("forward", None)  # a patched forward would still call the original model
    add_fused_lm_head(twin)
    return twin.eval().requires_grad_(False)


def start_model_source(model: nn.Module) -> str:
    """Where `model`'s starting weights can be loaded from again (a local folder or hub name), or a ModelError."""
    source = getattr(model.config, "_name_or_path", "") or ""
    if not source:
        raise ModelError("history/reference model 'base' with full fine-tuning under DeepSpeed ZeRO-3 reloads the "
                         "starting weights, but this model was built from scratch in memory; save it first and load "
                         "it by path, use LoRA (the base is then the adapter-disabled model), or use ZeRO-2")
    return source


def load_reference_model(name_or_path: str, like: nn.Module, trust_remote_code: bool = False) -> nn.Module:
    """A reference model from a hub name or a local folder, frozen, with the dtype and device of `like`."""
    from transformers import AutoModelForCausalLM

    parameter = next(like.parameters())
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=parameter.dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"reference model {name_or_path!r} could not be loaded: {error}") from error
    add_fused_lm_head(model)
    return model.to(parameter.device).eval().requires_grad_(False)


def first_changed_layer(model: nn.Module) -> int:
    """The first decoder layer whose output can differ between `model` and its history model (the same model with
    its adapters disabled, or with EMA weights swapped in); 0 when nothing is gained or a module before the decoder
    layers (the embeddings) can differ.

    A module can differ where it has a trainable parameter (the EMA swaps exactly those) or is a PEFT adapter layer
    or wrapper (disabled for the base history, trainable or not). Below that layer the two models compute the same
    hidden states, so a history pass can start there from the training forward's (`decoder_from_layer`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layers = decoder.layers
    layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    after = {id(m) for part in (getattr(decoder, "norm", None), base.get_output_embeddings()) if part is not None
             for m in part.modules()}
    first = len(layers)
    for module in base.modules():
        differs = isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) or any(
            p.requires_grad for p in module.parameters(recurse=False))
        if not differs or id(module) in after:
            continue
        if id(module) not in layer_of:
            return 0
        first = min(first, layer_of[id(module)])
    return first if first < len(layers) else 0


class ParameterEma:
    """theta_his <- alpha * theta_his + (1 - alpha) * theta over the trainable parameters only (docs/methods.md s.1).

    Under LoRA that is the adapter weights, so the EMA history costs a few MB. `swapped_in` lets the model itself
    run with the EMA weights (tensor swap, no copy), so no second model is kept.
    """

    def __init__(self, model: nn.Module, alpha: float, interval: int = 1):
        self.alpha, self.interval = alpha, interval
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if not self.shadow:
            raise ModelError("history_model 'ema': the model has no trainable parameters to average")
        self.updated_at = 0  # the global step of the last update (history-model age = step - updated_at)

    def _parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise ModelError(f"EMA state names parameters the model lacks, e.g. {missing[0]}")
        return {n: params[n] for n in self.shadow}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.interval:
            return
        for name, param in self._parameters(model).items():
            self.shadow[name].lerp_(param.detach().to(self.shadow[name].dtype), 1.0 - self.alpha)
        self.updated_at = step

    @contextmanager
    def swapped_in(self, model: nn.Module):
        params = self._parameters(model)

        def swap():
            for name, param in params.items():
                param.data, self.shadow[name] = self.shadow[name], param.data

        swap()
        try:
            yield model
        finally:
            swap()

    def save(self, folder: str) -> None:
        """Write the EMA state into a checkpoint folder (temporary name, then rename)."""
        from tokensieve.files import replace_atomically

        state = {n: t.contiguous() for n, t in self.shadow.items()}
        metadata = {"updated_at": str(self.updated_at), "alpha": str(self.alpha)}
        replace_atomically(Path(folder) / EMA_FILE, lambda p: save_file(state, str(p), metadata=metadata))

    def load(self, folder: str) -> bool:
        """Read the EMA state of a checkpoint folder; False when it has none (a run started without EMA)."""
        path = os.path.join(folder, EMA_FILE)
        if not os.path.exists(path):
            return False
        state = load_file(path)
        if set(state) != set(self.shadow):
            raise ModelError(f"{path}: EMA state does not match the model's trainable parameters")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            self.updated_at = int(handle.metadata().get("updated_at", 0))
        return True
