"""Start a run: in this process, or through `accelerate launch -m tokensieve.train` (started in-process)."""

import os
import subprocess
from pathlib import Path

import yaml

from tokensieve.errors import TokensieveError
from tokensieve.launch.recipe import LaunchArguments, load_recipe, profile_path

TRAIN_MODULE = "tokensieve.train"
# Shipped profiles name their DeepSpeed JSON relative to the repository root (launch/deepspeed/...).
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_profile() -> str:
    """The profile used when a recipe asks for several processes but names none."""
    import torch

    # Without a profile accelerate would start ONE process on a machine with no GPU; cpu-ddp really starts them.
    return "ddp" if torch.cuda.is_available() else "cpu-ddp"


def multinode_args(launch_args: LaunchArguments) -> list[str]:
    """The `accelerate launch` arguments that place this machine in a multi-machine run ([] on one machine)."""
    if launch_args.num_machines == 1:
        return []
    args = [
        "--num_machines", str(launch_args.num_machines),
        "--machine_rank", str(launch_args.machine_rank),
        "--main_process_ip", launch_args.main_process_ip,
    ]
    if launch_args.main_process_port is not None:
        args += ["--main_process_port", str(launch_args.main_process_port)]
    if launch_args.same_network:
        args.append("--same_network")
    return args


def _read_profile(profile: str) -> dict:
    return yaml.safe_load(Path(profile_path(profile)).read_text(encoding="utf-8")) or {}


def deepspeed_config_file(profile: str) -> Path | None:
    """The absolute path of a profile's DeepSpeed JSON, so the launch works from any directory (None if none)."""
    name = (_read_profile(profile).get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not name or Path(name).is_absolute() or Path(name).is_file():
        return Path(name).resolve() if name else None
    return REPO_ROOT / name


def build_accelerate_args(recipe_path, launch_args: LaunchArguments, overrides=()) -> list[str]:
    """The full `accelerate launch` argument list that runs `python -m tokensieve.train RECIPE overrides...`."""
    profile = launch_args.profile or default_profile()
    args = ["--config_file", str(profile_path(profile)), "--num_processes", str(launch_args.num_processes)]
    ds_file = deepspeed_config_file(profile)
    if ds_file is not None:
        args += ["--deepspeed_config_file", str(ds_file)]
    if launch_args.num_machines == 1 and launch_args.main_process_port is not None:
        args += ["--main_process_port", str(launch_args.main_process_port)]
    args += multinode_args(launch_args)
    if launch_args.mixed_precision is not None:
        args += ["--mixed_precision", launch_args.mixed_precision]
    args += list(launch_args.extra_args)
    return args + ["-m", TRAIN_MODULE, str(recipe_path), *overrides]


def is_cpu_deepspeed(profile: str | None) -> bool:
    """Whether an accelerate profile runs DeepSpeed on CPU (its processes then need DS_ACCELERATOR=cpu)."""
    if profile is None:
        return False
    config = _read_profile(profile)
    return config.get("distributed_type") == "DEEPSPEED" and bool(config.get("use_cpu"))


def launch(recipe_path, overrides=None):
    """Run the recipe at `recipe_path` as its `launch:` section says.

    One process and no profile: train right here (returns the TrainOutput). Otherwise start
    `accelerate launch` in-process, which starts the processes (returns None once they all finish).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    overrides = list(overrides or [])
    recipe = load_recipe(recipe_path, overrides)  # fail on a bad recipe before starting any process
    if not recipe.launch.distributed:
        from tokensieve.launch.run import run_training

        return run_training(recipe)
    from tokensieve.launch.run import check_trackers

    check_trackers(recipe.training)  # here, before any process starts
    argv = build_accelerate_args(recipe_path, recipe.launch, overrides)
    if is_cpu_deepspeed(recipe.launch.profile or default_profile()):
        os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by the processes accelerate starts
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except (ChildFailedError, subprocess.CalledProcessError) as error:
        raise TokensieveError(f"training failed in a launched process (see its output above): {error}") from error
    return None
