"""Every place tokensieve depends on an internal of transformers or TRL, each wrapped once here.

Upstream renames internals from one release to the next (transformers 5.24 passes the KV cache to the attention
modules as `cache=`, where 5.23 passed `past_key_values=`). Code elsewhere in tokensieve goes through the functions
below, so such a change shows up in one place, and `tests/test_upstream.py` fails with a message that names it.

What is reached for, and why there is no public API for it:
- the KV-cache keyword of a model's forward / `generate` and of its attention modules (`cache_argument`,
  `cache_in`): renamed in transformers 5.24, both names accepted here;
- a decoder's layers called one by one (`run_decoder_layers`, for PromptDistill's two-stage prefill, where the later
  layers see fewer tokens than the earlier ones): the layers' forward keywords (`attention_mask`, `position_ids`,
  `position_embeddings`, the cache keyword, `use_cache`) and the decoder's `rotary_emb`, as the model's own forward
  passes them;
- a forward that starts at a later decoder layer (`decoder_from_layer`, for ssToken's history pass under LoRA, whose
  first layers are the same as the trained model's): the earlier layers' `forward` is replaced on the instance for
  the duration of the block, so the model's own forward still builds the masks, the rotary embeddings and the head;
- `config._attn_implementation` (`attn_implementation`): transformers has a public setter
  (`set_attn_implementation`) but no public getter;
- a function of a model's own modelling file, e.g. `eager_attention_forward` and `apply_rotary_pos_emb`
  (`modeling_function`): not exported, and each architecture has its own copy;
- `trl.trainer.utils._use_triton`, read by TRL's fused LM head (`fused_head_labelled_positions_only`): swapped only
  for the duration of our trainers' loss computation, never at import;
- private `Trainer`/`SFTTrainer` methods our trainers override (`PRIVATE_OVERRIDES`, checked by
  `check_private_overrides` when a trainer is built): they have no public hook. Inside them we also read
  `Trainer._signature_columns` and call `Trainer._get_output_dir`;
- names imported from a library's submodules rather than its top level (`SUBMODULE_IMPORTS`): documented or
  extension APIs (the Cache API, AttentionInterface's registries, TRL's fused LM head, PEFT's adapter layer classes)
  whose module path can move.
  They stay plain imports at their call sites (an ImportError names them); the test imports every one.
Registering our attention functions with `AttentionInterface` (and the mask registry) adds two names under our own
prefix; it is transformers' documented extension point and changes nothing for any other model.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from functools import lru_cache

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the newest name first


class UpstreamChange(RuntimeError):
    """An internal of transformers or TRL that tokensieve relies on is not there any more (or has changed)."""


def _versions() -> str:
    import transformers
    import trl

    return f"transformers {transformers.__version__}, trl {trl.__version__}"


# --- the KV cache keyword -------------------------------------------------------------------------------------------

def cache_in(kwargs: dict):
    """The cache an attention module (or a model forward) was called with, under either keyword; None if none."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


@lru_cache(maxsize=None)
def _cache_argument_of(cls: type) -> str:
    parameters = inspect.signature(cls.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise UpstreamChange(f"{cls.__name__}.forward takes none of {', '.join(CACHE_ARGUMENTS)} ({_versions()}): the KV-"
                         f"cache keyword was renamed again; add the new name to CACHE_ARGUMENTS in {__name__}")


def cache_argument(model) -> str:
    """The keyword under which `model`'s forward and `generate` take a KV cache with the installed transformers:
    `cache` from 5.24 on, `past_key_values` before (5.24 still accepts it, with a FutureWarning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_argument_of(type(base))


def with_cache(model, cache) -> dict:
    """`{keyword: cache}` for `model(**inputs, **with_cache(model, cache))` and `model.generate(...)`."""
    return {cache_argument(model): cache}


def run_decoder_layers(decoder, indices, hidden, attention_mask, position_ids, cache):
    """Run `decoder.layers[i]` for i in `indices` as the decoder's own forward does (rotary embeddings from its
    `rotary_emb`, the 4D `attention_mask` as given, the KV cache under the layer's keyword); returns the hidden
    states. Older releases returned a tuple from each layer; both are handled."""
    if not hasattr(decoder, "rotary_emb"):
        raise UpstreamChange(f"{type(decoder).__name__} has no rotary_emb ({_versions()}): the decoder no longer "
                             f"computes the rotary embeddings once for all layers")
    rotary = decoder.rotary_emb(hidden, position_ids=position_ids)
    for index in indices:
        layer = decoder.layers[index]
        hidden = layer(hidden, attention_mask=attention_mask, position_ids=position_ids, position_embeddings=rotary,
                       use_cache=True, **with_cache(layer, cache))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


@contextmanager
def decoder_from_layer(decoder, start: int, hidden):
    """Within this block a forward of the model skips `decoder.layers[:start]` and feeds `hidden` (the input of layer
    `start`, [B, T, D], e.g. recorded during another forward) to layer `start`; everything else (embeddings, masks,
    rotary embeddings, the later layers, the norm, the head) runs as the model's own forward runs it.

    The skipped layers' `forward` is replaced on the instance (an identity on the hidden states) and put back on exit,
    as is any instance `forward` that was there before (accelerate's hooks put one there)."""
    layers = decoder.layers
    if not 0 < start < len(layers):
        raise ValueError(f"start layer {start}: expected 0 < start < {len(layers)}")

    def identity(*args, **kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def feed(module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    saved = [layer.__dict__.get("forward") for layer in layers[:start]]
    handle = layers[start].register_forward_pre_hook(feed, with_kwargs=True)
    for layer in layers[:start]:
        layer.forward = identity
    try:
        yield
    finally:
        handle.remove()
        for layer, forward in zip(layers[:start], saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


# --- attention implementation ---------------------------------------------------------------------------------------

def attn_implementation(model) -> str | None:
    """The attention implementation `model` runs (e.g. "sdpa", "eager"); transformers has no public getter."""
    config = model.config.get_text_config(decoder=True)
    if not hasattr(config, "_attn_implementation"):
        raise UpstreamChange(f"{type(config).__name__} has no _attn_implementation ({_versions()}): transformers "
                             f"moved where a model's attention implementation is recorded")
    return config._attn_implementation


def modeling_function(module, name: str):
    """The function `name` of the modelling file that defines `module`'s class, e.g. `eager_attention_forward`
    or `apply_rotary_pos_emb` of modeling_qwen3 (so it is applied exactly as that model applies it)."""
    source = sys.modules[type(module).__module__]
    function = getattr(source, name, None)
    if function is None:
        raise UpstreamChange(f"{source.__name__} has no {name} ({_versions()}): transformers renamed or moved it")
    return function


# --- TRL's fused LM head --------------------------------------------------------------------------------------------

@contextmanager
def fused_head_labelled_positions_only():
    """Within this block, TRL's fused LM head (`add_fused_lm_head`) projects only labelled positions on CPU too.

    TRL compacts to labelled positions only where Triton runs, and projects every position elsewhere so that compiled
    tile shapes stay fixed. On CPU nothing is compiled and the prompt positions are only extra work (the tiny base's
    1400-step training: 477 s without, 281 s with, same loss and gradients). TRL reads the module-level
    `trl.trainer.utils._use_triton` on every call; it is swapped here and restored on exit, so nothing outside
    tokensieve's trainers sees a change. Where TRL no longer has it, the block changes nothing (same results, slower on
    CPU) and tests/test_upstream.py fails naming it.
    """
    import trl.trainer.utils as trl_utils

    decides = getattr(trl_utils, "_use_triton", None)
    if decides is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or decides(device)
    try:
        yield
    finally:
        trl_utils._use_triton = decides


# --- private Trainer methods our trainers override ------------------------------------------------------------------

# name -> why we override it (no public hook does the same job)
PRIVATE_OVERRIDES = {
    "_prepare_dataset": "token columns and the reference prompt are checked/added after TRL tokenizes",
    "_set_signature_columns_if_needed": "keeps the token columns the collator needs",
    "_get_num_items_in_batch": "the global normaliser of a selected-token loss (gradient accumulation, ranks)",
    "_save_checkpoint": "writes the EMA history model into the checkpoint before the trainer state",
    "_load_from_checkpoint": "resumes gate / selector weights that are not part of the model's state dict",
}


def _parameters(function) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@lru_cache(maxsize=None)  # once per class: it runs whenever one of our trainers is built
def check_private_overrides(cls: type) -> None:
    """Fail, naming the upstream change, if a private method `cls` overrides is gone from (or has other parameters
    in) the transformers/TRL class it comes from. A silently unused override would train with the wrong loss
    normaliser or resume without the gates, so this runs whenever one of our trainers is built."""
    ours = [klass for klass in cls.__mro__ if klass.__module__.startswith("tokensieve.")]
    upstream = [klass for klass in cls.__mro__ if klass not in ours and klass is not object]
    for name in PRIVATE_OVERRIDES:
        override = next((vars(klass)[name] for klass in ours if name in vars(klass)), None)
        if override is None:
            continue
        original = next((vars(klass)[name] for klass in upstream if name in vars(klass)), None)
        if original is None:
            raise UpstreamChange(
                f"{cls.__name__}.{name} overrides a private method that {', '.join(k.__name__ for k in upstream[:2])} "
                f"no longer has ({_versions()}); it was overridden for: {PRIVATE_OVERRIDES[name]}")
        if _parameters(override) != _parameters(original):
            raise UpstreamChange(
                f"{cls.__name__}.{name} takes ({', '.join(_parameters(override))}) but the installed upstream method "
                f"takes ({', '.join(_parameters(original))}) ({_versions()}); it was overridden for: "
                f"{PRIVATE_OVERRIDES[name]}")


# module path -> the names tokensieve imports from it
SUBMODULE_IMPORTS = {
    "accelerate.commands.launch": ("launch_command", "launch_command_parser"),
    "transformers.activations": ("ACT2FN",),
    "transformers.cache_utils": ("Cache", "DynamicLayer"),
    "transformers.integrations": ("is_deepspeed_zero3_enabled",),
    "transformers.masking_utils": ("ALL_MASK_ATTENTION_FUNCTIONS", "sdpa_mask"),
    "transformers.modeling_utils": ("ALL_ATTENTION_FUNCTIONS",),
    "transformers.tokenization_utils_tokenizers": ("TokenizersBackend",),
    "transformers.trainer_utils": ("PREFIX_CHECKPOINT_DIR", "get_last_checkpoint"),
    "peft.tuners.tuners_utils": ("BaseTunerLayer",),
    "peft.utils.other": ("AuxiliaryTrainingWrapper",),
    "trl.data_utils": ("common_prefix_length",),
    "trl.models.utils": ("prepare_deepspeed",),
    "trl.scripts.utils": ("DatasetConfig",),
    "trl.trainer.utils": ("add_fused_lm_head",),
}


# --- activation checkpointing ---------------------------------------------------------------------------------------

def resolve_checkpointing_default(config) -> None:
    """Call before `super().__post_init__()` in a TRL config subclass: TRL's own default `gradient_checkpointing=True`
    makes transformers >= 5.24 warn that the name is deprecated on every config, although the user set nothing.
    When the user set neither name, the new one (`activation_checkpointing`) gets TRL's default instead."""
    if getattr(config, "activation_checkpointing", False) is None and config.gradient_checkpointing is True:
        config.activation_checkpointing = True


def checkpointing_enabled(args) -> bool:
    """Whether a TrainingArguments asks for activation (gradient) checkpointing, under either name."""
    value = getattr(args, "activation_checkpointing", None)
    return bool(args.gradient_checkpointing if value is None else value)
