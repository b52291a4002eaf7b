"""The one place that builds datasets: hub names or local files/folders -> validated train/test splits.

A source is a `trl.scripts.utils.DatasetConfig` (path, name, data_dir, data_files, split, columns, fraction).
Its `path` is a hub dataset name (or a `datasets` builder such as "json" with `data_files`), a local file
(.json, .jsonl, .parquet, .arrow), a folder written by `save_to_disk`, or a folder of data files whose names give
the splits (train.jsonl, test.jsonl). Several sources are a mixture: concatenated (with TRL's `fraction` rule),
then shuffled with `shuffle_seed`.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import os
from dataclasses import dataclass, field

import datasets
from trl.scripts.utils import DatasetConfig

from tokensieve.data.formats import detect_format, is_conversational, validate_rows
from tokensieve.errors import DataError, RecipeError

__all__ = ["DataArguments", "DatasetConfig", "detect_format", "load_splits"]

# File extension -> the `datasets` builder that reads it.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
# Extensions that mark a path as a local file even when it does not exist (so we say "not found", not "hub").
_FILE_LIKE = set(FILE_BUILDERS) | {".csv", ".tsv", ".txt", ".gz", ".zst", ".xz", ".bz2", ".zip"}


@dataclass
class DataArguments:
    """The `data:` section of a recipe: which datasets to train and evaluate on, in TRL's vocabulary."""

    datasets: list[DatasetConfig] = field(
        default_factory=list,
        metadata={
            "help": "Training sources, each a DatasetConfig (path, name, data_dir, data_files, split, columns, "
            "fraction). `path` is a hub dataset name, a local .json/.jsonl/.parquet/.arrow file, or a folder "
            "(a save_to_disk folder or a folder of data files). Several sources are concatenated and shuffled."
        },
    )
    curriculum: list[DatasetConfig] = field(
        default_factory=list,
        metadata={
            "help": "Sources trained on first, in their own row order, before the shuffled `datasets` mixture "
            "(e.g. a warm-up task). Needs training.train_sampling_strategy: sequential, or the trainer's "
            "sampler shuffles everything together again."
        },
    )
    eval_datasets: list[DatasetConfig] = field(
        default_factory=list,
        metadata={"help": "Evaluation sources, same form as `datasets`; they make the 'test' split."},
    )
    test_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this share (0 < x < 1) or number (>= 1) of training examples as the 'test' split. "
            "Cannot be combined with `eval_datasets`."
        },
    )
    shuffle_seed: int = field(
        default=0, metadata={"help": "Seed for shuffling the training mixture and for `test_split_size`."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many training examples (after shuffling)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many evaluation examples (the first ones)."}
    )

    def __post_init__(self):
        self.datasets = _as_configs(self.datasets, "datasets")
        self.curriculum = _as_configs(self.curriculum, "curriculum")
        self.eval_datasets = _as_configs(self.eval_datasets, "eval_datasets")
        if self.test_split_size is not None:
            if self.eval_datasets:
                raise RecipeError("data: set either `eval_datasets` or `test_split_size`, not both.")
            if not 0 < self.test_split_size < 1 and not (
                self.test_split_size >= 1 and float(self.test_split_size).is_integer()
            ):
                raise RecipeError(
                    f"data.test_split_size: expected a share in (0, 1) or a whole number >= 1, "
                    f"got {self.test_split_size!r}."
                )
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise RecipeError(f"data.{key}: expected a number >= 0, got {value!r}.")


def _as_configs(entries, key: str) -> list[DatasetConfig]:
    """Turn recipe dicts into DatasetConfig objects; unknown keys are an error, not a silent default."""
    if not isinstance(entries, (list, tuple)):
        raise RecipeError(f"data.{key}: expected a list of datasets, got {type(entries).__name__} {entries!r}.")
    allowed = [f.name for f in dataclasses.fields(DatasetConfig)]
    configs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, DatasetConfig):
            configs.append(entry)
            continue
        if not isinstance(entry, dict):
            raise RecipeError(
                f"data.{key}[{index}]: expected a mapping with keys {allowed}, got {type(entry).__name__} {entry!r}."
            )
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise RecipeError(f"data.{key}[{index}]: unknown key(s) {unknown}; allowed keys: {allowed}.")
        if not entry.get("path"):
            raise RecipeError(f"data.{key}[{index}]: `path` is required (a hub name, a file or a folder).")
        configs.append(DatasetConfig(**entry))
    return configs


def load_splits(args: DataArguments) -> datasets.DatasetDict:
    """Load, validate and mix the sources of `args` into a DatasetDict with "train" and, if asked, "test".

    Every row of every source is validated (see `tokensieve.data.formats`); any problem raises DataError naming
    the source, the example index and the field.
    """
    if not args.datasets:
        raise DataError("data.datasets is empty: give at least one dataset (a hub name, a file or a folder).")
    # In memory: shuffle indices would otherwise be cached as files, even inside the user's save_to_disk folder.
    train = _load_mixture(args.datasets).shuffle(seed=args.shuffle_seed, keep_in_memory=True)
    if args.curriculum:
        first = [_load_mixture([config]) for config in args.curriculum]
        try:
            train = datasets.concatenate_datasets([*first, train])
        except ValueError as error:
            raise DataError(
                f"data.curriculum cannot precede data.datasets: their columns differ ({error}); "
                "select the shared ones with `columns:`."
            ) from error
    splits = {"train": train}
    if args.eval_datasets:
        splits["test"] = _load_mixture(args.eval_datasets)
    elif args.test_split_size is not None:
        # `train` is already shuffled, so its tail is a random held-out set (datasets' own train_test_split
        # cannot keep its indices in memory for file-backed data).
        size = args.test_split_size
        n_test = math.ceil(size * len(train)) if size < 1 else int(size)
        if not 0 < n_test < len(train):
            raise DataError(
                f"data.test_split_size={size}: cannot hold out {n_test} of {len(train)} training examples."
            )
        n_train = len(train) - n_test
        held_out = range(n_train, len(train))
        splits = {
            "train": train.select(range(n_train), keep_in_memory=True),
            "test": train.select(held_out, keep_in_memory=True),
        }
    limits = {
        "train": ("max_train_samples", args.max_train_samples),
        "test": ("max_eval_samples", args.max_eval_samples),
    }
    for split, dataset in splits.items():
        key, limit = limits[split]
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))), keep_in_memory=True)
        if len(dataset) == 0:
            raise DataError(f"split '{split}' is empty: nothing is left after data.{key}={limit}.")
        splits[split] = dataset
    return datasets.DatasetDict(splits)


def _load_mixture(configs: list[DatasetConfig]) -> datasets.Dataset:
    """Load and validate each source, check they share one format, then concatenate them."""
    sources, parts, kinds = [], [], []
    for config in configs:
        source = _source_name(config)
        dataset = _load_source(config, source)
        if config.columns is not None:
            missing = [c for c in config.columns if c not in dataset.column_names]
            if missing:
                raise DataError(f"{source}: `columns` asks for {missing}, but the columns are {dataset.column_names}.")
            dataset = dataset.select_columns(config.columns)
        if len(dataset) == 0:
            raise DataError(f"{source}: has no examples.")
        fmt = detect_format(dataset, source)
        validate_rows(dataset, fmt, source)
        sources.append(source)
        parts.append(dataset)
        conversational = fmt == "prompt_completion" and is_conversational(dataset, fmt)
        kinds.append(fmt + (" (conversational)" if conversational else ""))
    if len(set(kinds)) > 1:
        listing = "; ".join(f"{source}: {kind}" for source, kind in zip(sources, kinds))
        raise DataError(f"the datasets of a mixture must share one format, got {listing}.")
    parts = _apply_fractions(parts, [config.fraction for config in configs], sources)
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as error:
        raise DataError(f"cannot mix {', '.join(sources)}: their columns have different types: {error}") from error


def _apply_fractions(parts, fractions, sources):
    """TRL's mixture rule: shares normalised to one, the first round(share * N) rows of each, no oversampling."""
    if all(fraction is None for fraction in fractions):
        return parts
    if any(fraction is None for fraction in fractions):
        raise DataError(f"`fraction` must be set for all datasets of a mixture or for none: got {fractions}.")
    if any(fraction < 0 for fraction in fractions) or sum(fractions) <= 0:
        raise DataError(f"`fraction` values must be >= 0 with a positive sum, got {fractions}.")
    weights = [fraction / sum(fractions) for fraction in fractions]
    total = min(len(part) / weight for part, weight in zip(parts, weights) if weight > 0)
    parts = [part.select(range(round(weight * total))) for part, weight in zip(parts, weights)]
    kept = [(source, len(part)) for source, part in zip(sources, parts)]
    if sum(count for _, count in kept) == 0:
        raise DataError(f"nothing is left after applying `fraction` {fractions}: rows kept {kept}.")
    return parts


def _source_name(config: DatasetConfig) -> str:
    """How error messages name a source: the file, or the folder/hub name with its split."""
    path = os.path.expanduser(config.path)
    if os.path.isfile(path) or (not os.path.exists(path) and _looks_local(config.path) and not config.data_files):
        return f"'{config.path}'"
    files = f" with data_files {config.data_files!r}" if config.data_files else ""
    return f"'{config.path}'{files} (split '{config.split}')"


def _looks_local(path: str) -> bool:
    """A path that names a local file or folder, as opposed to a hub dataset name like 'org/name'."""
    return path.startswith(("/", "./", "../", "~", ".\\")) or os.path.splitext(path)[1].lower() in _FILE_LIKE


def _load_source(config: DatasetConfig, source: str) -> datasets.Dataset:
    """Read one source into a Dataset, turning every reading failure into a DataError that names it."""
    path = os.path.expanduser(config.path)
    try:
        if os.path.isfile(path):
            return _load_file(path, source)
        if os.path.isdir(path) and _is_saved_dataset(path):
            return _load_saved(path, config.split, source)
        if not os.path.exists(path) and _looks_local(config.path) and not config.data_files:
            raise DataError(f"{source}: file not found (looked in {os.path.abspath(path)}).")
        # A folder of data files, a builder name with data_files, or a hub dataset name.
        return datasets.load_dataset(
            config.path, name=config.name, data_dir=config.data_dir, data_files=config.data_files, split=config.split
        )
    except DataError:
        raise
    except FileNotFoundError as error:
        raise DataError(f"{source}: file not found: {_root_cause(error)}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{source}: not valid UTF-8 text ({error}); re-save the file as UTF-8.") from error
    except Exception as error:  # datasets/pyarrow raise many types; the user needs the file and the cause
        raise DataError(f"{source}: could not be read: {_root_cause(error)}") from error


def _load_file(path: str, source: str) -> datasets.Dataset:
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_BUILDERS:
        raise DataError(
            f"{source}: unsupported file extension {extension or '(none)'!r}; supported: {sorted(FILE_BUILDERS)} "
            "or a folder written by save_to_disk."
        )
    if os.path.getsize(path) == 0:
        raise DataError(f"{source}: the file is empty (no examples).")
    if FILE_BUILDERS[extension] == "json":
        _check_utf8(path, source)
    # One file is one split, whatever `split` says; the name "train" is only a label here.
    return datasets.load_dataset(FILE_BUILDERS[extension], data_files={"train": path}, split="train")


def _check_utf8(path: str, source: str) -> None:
    """Raise DataError at the first line that is not UTF-8 (pyarrow's JSON reader lets bad bytes through)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line = lines + chunk[: max(error.start, 0)].count(b"\n")
                raise DataError(
                    f"{source}: not valid UTF-8 at line {line} (byte {offset + error.start}): {error.reason}; "
                    "re-save the file as UTF-8."
                ) from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{source}: not valid UTF-8: the file ends inside a character.") from None


def _is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def _load_saved(path: str, split: str, source: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: no split '{split}'; the folder has {list(loaded)}.")
        return loaded[split]
    return loaded


def _root_cause(error: BaseException) -> str:
    """The most useful message of a chained exception: pyarrow's parse error if any, else the innermost one."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    pyarrow_errors = [e for e in chain if type(e).__module__.startswith("pyarrow")]
    cause = pyarrow_errors[0] if pyarrow_errors else chain[-1]
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
