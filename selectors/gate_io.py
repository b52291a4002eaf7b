"""Retention-gate exports: gates.safetensors + gates.json (next to any LoRA adapter), written and read.

gates.json records the architecture and sizes the gates were trained for and the base model (name or path and
revision); loading gates onto another architecture or size, or a missing or truncated file, is a ModelError.
Files are written under a temporary name and renamed, the JSON last, so a complete-looking export is complete.
`tokensieve.launch.export.load_retention_model` loads base + adapter + gates in one call.
"""

from __future__ import annotations

from pathlib import Path

from tokensieve.errors import ModelError
from tokensieve.files import base_model_record, read_export_config, read_export_weights, write_export
from tokensieve.selectors.attention import attach_gates, gates_of
from tokensieve.selectors.kv_cache import DEFAULT_BUFFER

GATES_FILE = "gates.safetensors"
GATES_CONFIG = "gates.json"
FORMAT = "tokensieve-retention-gates"


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gate_state(model) -> dict:
    """The gate weights by layer: {"layers.<i>.<param>": tensor}."""
    return {f"layers.{i}.{name}": tensor.detach().cpu().contiguous()
            for i, gate in enumerate(gates_of(model)) for name, tensor in gate.state_dict().items()}


def gates_config(model, memory_size: int | None, buffer_size: int, attention: str = "plain") -> dict:
    config = _base_model(model).config
    text = config.get_text_config(decoder=True)
    return {
        "format": FORMAT,
        "version": 1,
        "architecture": text.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "gate": gates_of(model)[0].config,
        "memory_size": memory_size,
        "buffer_size": buffer_size,
        "attention": attention,
        **base_model_record(config),
    }


def save_gates(model, output_dir, memory_size: int | None = None, buffer_size: int = DEFAULT_BUFFER,
               attention: str = "plain") -> Path:
    """Write gates.safetensors and gates.json into `output_dir` (weights first, config last). memory_size,
    buffer_size and attention ("plain" or "decayed") are the defaults of a cache built from this export."""
    return write_export(output_dir, GATES_FILE, gate_state(model), GATES_CONFIG,
                        gates_config(model, memory_size, buffer_size, attention))


def read_gates_config(path) -> dict:
    return read_export_config(path, GATES_CONFIG, FORMAT, "retention-gate")


def check_compatible(model, config: dict, where) -> None:
    """ModelError unless the gates in `config` were trained for this model's architecture and sizes."""
    text = _base_model(model).config.get_text_config(decoder=True)
    for key, have in (("architecture", text.model_type), ("hidden_size", text.hidden_size),
                      ("num_hidden_layers", text.num_hidden_layers), ("num_key_value_heads", text.num_key_value_heads)):
        if config.get(key) != have:
            raise ModelError(f"{where}: gates were trained for {key} = {config.get(key)!r}, this model has {have!r}")


def load_gate_weights(model, path) -> None:
    """Load gates.safetensors from `path` into the gates already attached to `model` (strict)."""
    state = read_export_weights(path, GATES_FILE, "gate")
    file = Path(path) / GATES_FILE
    gates = gates_of(model)
    for i, gate in enumerate(gates):
        prefix = f"layers.{i}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            gate.load_state_dict(own, strict=True)
        except RuntimeError as error:
            raise ModelError(f"{file}: gate {i} does not fit this model: {' '.join(str(error).split())[:300]}") from None
    if len(state) != sum(len(g.state_dict()) for g in gates):
        raise ModelError(f"{file}: holds {len(state)} tensors, this model's gates have "
                         f"{sum(len(g.state_dict()) for g in gates)}")


def load_gates(model, path):
    """Attach gates to `model` as gates.json at `path` describes, and load their weights. Returns the model."""
    config = read_gates_config(path)
    check_compatible(model, config, path)
    gate = config["gate"]
    attach_gates(model, gate["intermediate_size"], gate["bias_init"], gate["act"])
    load_gate_weights(model, path)
    return model
