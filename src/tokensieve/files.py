"""Writing files and folders so that a failed or interrupted run never leaves something half-written in place, and
the one file format of tokensieve's exports (gates, selectors): safetensors weights + a JSON config."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokensieve.errors import ModelError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_atomically(path, write) -> Path:
    """Call `write(temporary path)` next to `path` (a file or a folder), then rename it to `path`, replacing what was
    there. On failure the temporary is removed and `path` is left as it was. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # a stale one from a killed run with the same pid
    try:
        write(tmp)
        if path.is_dir() and not path.is_symlink():  # os.replace cannot replace a non-empty folder
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


# --- exports: a safetensors weights file + a JSON config (retention gates, query selectors) -------------------------

def base_model_record(config) -> dict:
    """Where an export's base model is found again: its name or path (a local folder made absolute, so it is found
    from any working directory) and its hub revision."""
    base = getattr(config, "_name_or_path", "") or ""
    if base and os.path.isdir(base):
        base = os.path.abspath(base)
    return {"base_model_name_or_path": base, "base_model_revision": getattr(config, "_commit_hash", None)}


def write_export(folder, weights_file: str, state: dict, config_file: str, config: dict) -> Path:
    """Weights (safetensors, tagged with the config's format) first, the JSON config last, each written atomically:
    an export whose config exists is complete."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomically(folder / weights_file,
                       lambda p: save_file(state, str(p), metadata={"format": config["format"]}))
    replace_atomically(folder / config_file, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def read_export_config(path, config_file: str, format_name: str, what: str) -> dict:
    """The JSON config of an export, or a ModelError naming the file: missing, not JSON, or another format."""
    file = Path(path) / config_file
    if not file.is_file():
        raise ModelError(f"{path}: no {config_file} (not a {what} export, or an incomplete one)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{file}: not valid JSON ({error})") from None
    if config.get("format") != format_name:
        raise ModelError(f"{file}: format is {config.get('format')!r}, expected {format_name!r}")
    return config


def read_export_weights(path, weights_file: str, what: str) -> dict:
    """The tensors of an export's weights file, or a ModelError naming it: missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / weights_file
    if not file.is_file():
        raise ModelError(f"{path}: {weights_file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelError(f"{file}: cannot read the {what} weights (truncated or corrupt file?): {error}") from None
