"""Synthetic tasks: a registry of generator modules and `make_task`, which writes a task's splits to disk.

Each generator module exposes `SPLITS` (default example counts per split), `OPTIONS` (a dataclass of its options
with defaults and help text) and `generate(split, n, seed, options) -> list[dict]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from tokensieve.errors import TokensieveError
from tokensieve.files import replace_atomically

# Task name -> module. Fixed constants of our code (never user strings), imported on first use so that one
# task's import cost or error does not touch the others.
_TASK_MODULES = {
    "noisy-sft": "tokensieve.data.synthetic.noisy_sft",
    "noisy-recall": "tokensieve.data.synthetic.noisy_recall",
    "mapped-recall": "tokensieve.data.synthetic.mapped_recall",
    "mqar": "tokensieve.data.synthetic.mqar",
    "needle-qa": "tokensieve.data.synthetic.needle_qa",
    "conditioned": "tokensieve.data.synthetic.conditioned",
    "induction": "tokensieve.data.synthetic.induction",
    # Real English prose (the shipped corpus, data/text), measured in a given tokenizer's tokens.
    "passkey": "tokensieve.data.real.passkey",
    "named-keys": "tokensieve.data.real.named_keys",
    "facts": "tokensieve.data.real.facts",
    "lm-text": "tokensieve.data.real.lm_text",
    "mapped-passkey": "tokensieve.data.real.mapped_passkey",
}


class _TaskRegistry(Mapping):
    """A read-only dict of task name -> generator module that imports each module when first looked up."""

    def __getitem__(self, task: str):
        if task not in _TASK_MODULES:
            raise TokensieveError(f"unknown task {task!r}; valid tasks: {sorted(_TASK_MODULES)}.")
        return importlib.import_module(_TASK_MODULES[task])

    def __iter__(self):
        return iter(_TASK_MODULES)

    def __len__(self):
        return len(_TASK_MODULES)

    def __contains__(self, task) -> bool:
        return task in _TASK_MODULES


TASKS = _TaskRegistry()


def build_options(task: str, options: dict):
    """Return the task's OPTIONS dataclass filled from `options`, converting strings (from the CLI) to field types.

    Unknown option names raise TokensieveError listing the valid ones.
    """
    options_class = TASKS[task].OPTIONS
    fields = {f.name: f for f in dataclasses.fields(options_class) if f.init}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TokensieveError(f"task {task!r}: unknown option(s) {unknown}; valid options: {sorted(fields)}.")
    hints = typing.get_type_hints(options_class)
    values = {name: _convert(task, name, value, hints[name]) for name, value in options.items()}
    try:
        return options_class(**values)
    except (TypeError, ValueError) as error:  # a module's own range checks
        raise TokensieveError(f"task {task!r}: invalid options {values}: {error}") from error


def _convert(task: str, name: str, value, annotation):
    """Convert one option value to its annotated type (bool, int, float, str, or X | None)."""
    target = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if type(None) in typing.get_args(annotation) and (value is None or str(value).lower() in ("none", "null")):
            return None
        target = next(a for a in typing.get_args(annotation) if a is not type(None))
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if target in (int, float, str):
            return target(value)
    except (TypeError, ValueError):
        raise TokensieveError(
            f"task {task!r}: option {name!r} expects {getattr(target, '__name__', target)}, got {value!r}."
        ) from None
    return value


def split_seed(seed: int, split: str) -> int:
    """A seed derived from (seed, split), stable across processes and Python versions, so splits differ."""
    digest = hashlib.sha256(f"{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_sizes(task: str, n: int | None = None) -> dict[str, int]:
    """Example counts per split: `n` replaces the train size; other splits keep their default unless n is smaller."""
    defaults = TASKS[task].SPLITS
    if n is None:
        return dict(defaults)
    if n < 1:
        raise TokensieveError(f"task {task!r}: n must be >= 1, got {n}.")
    return {split: n if split == "train" else min(size, n) for split, size in defaults.items()}


def make_task(task: str, out_dir, n: int | None = None, seed: int = 0, splits: list[str] | None = None,
              **options) -> dict[str, Path]:
    """Generate `task` and write `<out_dir>/<split>.jsonl` for each split (or only `splits`) plus `<out_dir>/meta.json`.

    Each file is written under a temporary name and renamed into place, so a reader never sees half a file. Returns the
    written paths keyed by split name, plus "meta".
    """
    module = TASKS[task]
    config = build_options(task, options)
    sizes = split_sizes(task, n)
    if splits is not None:
        unknown = sorted(set(splits) - set(sizes))
        if unknown or not splits:
            raise TokensieveError(f"task {task!r}: unknown split(s) {unknown}; its splits are {sorted(sizes)}.")
        sizes = {split: size for split, size in sizes.items() if split in splits}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, size in sizes.items():
        rows = module.generate(split, size, split_seed(seed, split), config)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        written[split] = _write_atomic(out_dir / f"{split}.jsonl", lines)
    meta = {
        "task": task,
        "seed": seed,
        "n": n,
        "options": dataclasses.asdict(config),
        "counts": sizes,
        "splits": splits,
        "default_counts": dict(module.SPLITS),
        "command": f"tokensieve data make {task} --out {out_dir.as_posix()}"
        + (f" --n {n}" if n is not None else "")
        + f" --seed {seed}"
        + (f" --splits {','.join(sizes)}" if splits is not None else "")
        + "".join(f" --{name} {value}" for name, value in options.items()),
    }
    written["meta"] = _write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return written


def _write_atomic(path: Path, text: str) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
