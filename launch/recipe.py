"""Recipes: one YAML file per run, parsed strictly into dataclasses (unknown keys and wrong types are errors).

    method: sft            # a name in tokensieve.launch.methods.METHODS
    model: {...}           # ModelArguments (tokensieve.launch.model)
    data: {...}            # DataArguments (tokensieve.data.loading)
    peft: {...}            # optional: peft.LoraConfig keyword arguments
    training: {...}        # the method's config class (trl.SFTConfig for sft)
    launch: {...}          # optional: LaunchArguments (processes, accelerate profile, machines)
"""

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tokensieve.data.loading import DataArguments
from tokensieve.errors import RecipeError
from tokensieve.launch.flags import split_flags
from tokensieve.launch.methods import METHODS
from tokensieve.launch.model import ModelArguments
from tokensieve.launch.schema import build_dataclass, check_section, init_fields, unknown_key_error

PROFILE_DIR = Path(__file__).parent / "accelerate"
# Profile name -> accelerate config file shipped in launch/accelerate/.
PROFILES = {name: PROFILE_DIR / f"{name}.yaml" for name in ("ddp", "zero2", "zero3", "cpu-ddp", "cpu-zero2", "cpu-zero3")}
SECTIONS = ("method", "model", "data", "peft", "training", "launch")
REQUIRED_SECTIONS = ("method", "model", "data", "training")


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 scalars: only true/false are booleans and 1e-4 is a float.

    YAML 1.1 reads `eval_strategy: no` as False and `learning_rate: 1e-4` as a string; recipes mean neither.
    """


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str):
    """Parse YAML text safely with recipe scalar rules (see RecipeLoader)."""
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: no arbitrary objects


@dataclass
class LaunchArguments:
    """How to start the run: how many processes, on how many machines, with which accelerate profile."""

    num_processes: int = field(
        default=1, metadata={"help": "Total number of training processes over all machines (accelerate's meaning)."}
    )
    profile: str | None = field(
        default=None,
        metadata={
            "help": "Accelerate profile: ddp, zero2, zero3, cpu-ddp, cpu-zero2, cpu-zero3, or a path to an accelerate "
            "config YAML. None with num_processes 1 trains in the current process; None with more picks ddp "
            "(cpu-ddp without a GPU)."
        },
    )
    num_machines: int = field(default=1, metadata={"help": "Number of machines (nodes) taking part."})
    machine_rank: int = field(default=0, metadata={"help": "Rank of this machine, 0 .. num_machines - 1."})
    main_process_ip: str | None = field(
        default=None, metadata={"help": "Address of the machine with rank 0 (needed when num_machines > 1)."}
    )
    main_process_port: int | None = field(
        default=None, metadata={"help": "Port on the rank-0 machine for the rendezvous (accelerate's default if unset)."}
    )
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = field(
        default=None, metadata={"help": "Overrides the profile's mixed_precision when set."}
    )
    same_network: bool = field(
        default=False, metadata={"help": "All machines share a local network (accelerate --same_network)."}
    )
    extra_args: list[str] = field(
        default_factory=list,
        metadata={"help": "More `accelerate launch` arguments, passed through as given, e.g. ['--max_restarts', '1']."},
    )

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.num_machines < 1:
            raise ValueError(f"num_machines must be >= 1, got {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"machine_rank must be in 0 .. {self.num_machines - 1}, got {self.machine_rank}")
        if self.num_processes < self.num_machines:
            raise ValueError(f"num_processes ({self.num_processes}) is the total over machines: "
                             f"it must be >= num_machines ({self.num_machines})")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("main_process_ip is required when num_machines > 1")
        if self.main_process_port is not None and not 1 <= self.main_process_port <= 65535:
            raise ValueError(f"main_process_port must be in 1 .. 65535, got {self.main_process_port}")
        if self.profile is not None:
            profile_path(self.profile)  # raises for an unknown name or a missing file

    @property
    def distributed(self) -> bool:
        """Whether the run goes through `accelerate launch` rather than the current process."""
        return self.num_processes > 1 or self.num_machines > 1 or self.profile is not None


def profile_path(profile: str) -> Path:
    """The accelerate config file of a profile name, or the given path if it exists."""
    if profile in PROFILES:
        return PROFILES[profile]
    path = Path(profile).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") or "/" in profile:
        if not path.is_file():
            raise ValueError(f"profile file not found: {profile}")
        return path
    raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)} or a path to an accelerate config")


@dataclass
class Recipe:
    """A parsed, validated recipe."""

    method: str
    model: ModelArguments
    data: DataArguments
    training: Any  # an instance of METHODS[method].config_class
    launch: LaunchArguments
    peft: dict | None = None
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the YAML after overrides, for the run record


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping with keys {', '.join(SECTIONS)}, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Turn ["--a.b", "1", "--c=x"] into [("a.b", 1), ("c", "x")]; values are read as YAML (read_yaml)."""
    pairs = []
    for key, text in split_flags(overrides, "override", "--training.learning_rate 1e-4"):
        try:
            pairs.append((key, read_yaml(text)))
        except yaml.YAMLError:
            raise RecipeError(f"override --{key}: cannot read value {text!r}") from None
    return pairs


def _set_dotted(raw: dict, key: str, value, where: str) -> None:
    """Set raw[a][b][c] = value for key "a.b.c", creating mappings on the way (digits index lists)."""
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise RecipeError(f"{where}: override --{key}: there is no item {here}")
            index = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and not isinstance(node.get(part), (dict, list)):
                node[part] = {}  # e.g. --peft.r 8 on a recipe without a peft section
        else:
            raise RecipeError(f"{where}: override --{key}: {'.'.join(parts[:depth])} is not a mapping or list")
        if last:
            node[index] = value
        else:
            node = node[index]


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """Return a copy of `raw` with command-line overrides applied; bare keys belong to `training`."""
    raw = copy.deepcopy(raw)
    pairs = parse_overrides(overrides)
    for key, value in pairs:  # the method decides which keys bare overrides may name
        if key == "method":
            raw["method"] = value
    method = raw.get("method")
    config_class = METHODS[method].config_class if isinstance(method, str) and method in METHODS else None
    for key, value in pairs:
        section = key.split(".", 1)[0]
        if section not in SECTIONS:
            if "." in key or config_class is None or key not in init_fields(config_class):
                allowed = list(init_fields(config_class)) if config_class else []
                error = unknown_key_error(f"training.{key}" if "." not in key else key, allowed, where,
                                          getattr(config_class, "__name__", "the training config"))
                raise RecipeError(f"{error} (from override --{key}; bare keys set training.<key>)")
            key = f"training.{key}"
        if key == "method":
            continue
        if "." not in key:
            raw[key] = value
        else:
            _set_dotted(raw, key, value, where)
    return raw


def load_recipe(path, overrides: list[str] | None = None) -> Recipe:
    """Read the recipe at `path`, apply `overrides` (["--training.learning_rate", "1e-4", ...]) and validate it.

    Raises RecipeError naming the file and the dotted key for unknown keys, missing keys and wrong types.
    """
    path = Path(path)
    where = str(path)
    raw = _read_yaml(path)
    if overrides:
        raw = apply_overrides(raw, overrides, where)
    for key in raw:
        if key not in SECTIONS:
            raise unknown_key_error(key, list(SECTIONS), where)
    for key in REQUIRED_SECTIONS:
        if key not in raw:
            raise RecipeError(f"{where}: missing required section '{key}'")
    method = raw["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise RecipeError(f"{where}: method: unknown method {method!r}; known methods: {', '.join(METHODS)}")
    config_class = METHODS[method].config_class

    model = build_dataclass(ModelArguments, raw["model"], "model", where)
    data = build_dataclass(DataArguments, raw["data"], "data", where)
    training_raw = raw["training"]
    if isinstance(training_raw, dict) and isinstance(training_raw.get("resume_from_checkpoint"), bool):
        # `resume_from_checkpoint: true` means "the last checkpoint in output_dir, if any", stored as "auto".
        training_raw = {**training_raw, "resume_from_checkpoint": "auto" if training_raw["resume_from_checkpoint"] else None}
    training = build_dataclass(config_class, training_raw, "training", where)
    launch = build_dataclass(LaunchArguments, raw.get("launch"), "launch", where)
    if data.curriculum and getattr(training, "train_sampling_strategy", None) != "sequential":
        raise RecipeError(
            f"{where}: data.curriculum needs training.train_sampling_strategy: sequential "
            f"(got {getattr(training, 'train_sampling_strategy', None)!r}); otherwise the sampler reshuffles it."
        )
    peft = None
    if raw.get("peft") is not None:
        from peft import LoraConfig

        peft = check_section(LoraConfig, raw["peft"], "peft", where)
        build_dataclass(LoraConfig, dict(peft), "peft", where)  # LoraConfig's own range checks
    return Recipe(method=method, model=model, data=data, training=training, launch=launch, peft=peft,
                  path=path, raw=raw)


CURATE_SECTIONS = ("model", "data", "curate")


@dataclass
class CurateRecipe:
    """A parsed curation recipe (`tokensieve curate`): the scoring model, the data, the curate options."""

    model: ModelArguments
    data: DataArguments
    curate: Any  # tokensieve.data.curation.CurateConfig
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)


def load_curate_recipe(path, overrides: list[str] | None = None) -> CurateRecipe:
    """Read a curation recipe (sections model, data, curate); bare overrides (--scorer x) set curate.<key>."""
    from tokensieve.data.curation import CurateConfig

    path = Path(path)
    where = str(path)
    raw = _read_yaml(path)
    for key, value in parse_overrides(overrides or []):
        if key.split(".", 1)[0] not in CURATE_SECTIONS:
            if "." in key or key not in init_fields(CurateConfig):
                error = unknown_key_error(f"curate.{key}" if "." not in key else key, list(init_fields(CurateConfig)),
                                          where, "CurateConfig")
                raise RecipeError(f"{error} (from override --{key}; bare keys set curate.<key>)")
            key = f"curate.{key}"
        _set_dotted(raw, key, value, where)
    for key in raw:
        if key not in CURATE_SECTIONS:
            raise unknown_key_error(key, list(CURATE_SECTIONS), where)
    for key in CURATE_SECTIONS:
        if key not in raw:
            raise RecipeError(f"{where}: missing required section '{key}'")
    return CurateRecipe(
        model=build_dataclass(ModelArguments, raw["model"], "model", where),
        data=build_dataclass(DataArguments, raw["data"], "data", where),
        curate=build_dataclass(CurateConfig, raw["curate"], "curate", where),
        path=path,
        raw=raw,
    )
