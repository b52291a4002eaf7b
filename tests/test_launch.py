"""Accelerate argument construction for every profile (one and several machines), and a real 2-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser

from tokensieve.launch.launcher import build_accelerate_args, deepspeed_config_file, is_cpu_deepspeed, multinode_args
from tokensieve.launch.recipe import PROFILES, LaunchArguments

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_args_parse_with_accelerate(profile):
    args = build_accelerate_args("recipes/x.yaml", LaunchArguments(num_processes=2, profile=profile), ["--max_steps", "3"])
    assert args[:4] == ["--config_file", str(PROFILES[profile]), "--num_processes", "2"]
    assert args[-5:] == ["-m", "tokensieve.train", "recipes/x.yaml", "--max_steps", "3"]
    parsed = launch_command_parser().parse_args(args)
    assert parsed.module and parsed.training_script == "tokensieve.train"
    assert parsed.training_script_args == ["recipes/x.yaml", "--max_steps", "3"]
    assert parsed.num_processes == 2


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_files_are_consistent(profile):
    config = yaml.safe_load(PROFILES[profile].read_text())
    cpu = profile.startswith("cpu-")
    assert config["use_cpu"] is cpu
    # MULTI_CPU would start one process on a CPU machine (it wants mpirun); CPU DDP goes through torchrun.
    assert config["distributed_type"] == ("DEEPSPEED" if "zero" in profile else "MULTI_GPU")
    assert is_cpu_deepspeed(profile) is (cpu and "zero" in profile)
    if "zero" in profile:
        assert "mixed_precision" not in config  # accelerate forbids it next to a DeepSpeed JSON
        ds_file = deepspeed_config_file(profile)
        assert ds_file.is_absolute() and ds_file.is_file()
        ds = yaml.safe_load(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == int(profile[-1])
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["bf16"]["enabled"] == "auto"
    else:
        assert config["mixed_precision"] == ("no" if cpu else "bf16")


def test_deepspeed_file_is_absolute_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_accelerate_args("r.yaml", LaunchArguments(num_processes=2, profile="zero3"))
    index = args.index("--deepspeed_config_file")
    assert Path(args[index + 1]) == REPO_ROOT / "launch" / "deepspeed" / "zero3.json"


@pytest.mark.parametrize("cuda,profile", [(False, "cpu-ddp"), (True, "ddp")])
def test_default_profile_depends_on_gpu(monkeypatch, cuda, profile):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = build_accelerate_args("r.yaml", LaunchArguments(num_processes=2))
    assert args[1] == str(PROFILES[profile])


def test_multinode_args():
    la = LaunchArguments(num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.1.2.3",
                         main_process_port=29501, same_network=True, profile="zero2", mixed_precision="bf16",
                         extra_args=["--max_restarts", "1"])
    assert multinode_args(la) == ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.1.2.3",
                                  "--main_process_port", "29501", "--same_network"]
    args = build_accelerate_args("r.yaml", la, [])
    parsed = launch_command_parser().parse_args(args)
    assert (parsed.num_processes, parsed.num_machines, parsed.machine_rank) == (16, 2, 1)
    assert (parsed.main_process_ip, parsed.main_process_port, parsed.same_network) == ("10.1.2.3", 29501, True)
    assert parsed.mixed_precision == "bf16" and parsed.max_restarts == 1
    assert multinode_args(LaunchArguments()) == []


def test_single_process_without_profile_is_not_distributed():
    assert not LaunchArguments().distributed
    assert LaunchArguments(profile="cpu-ddp").distributed and LaunchArguments(num_processes=2).distributed


def test_sbatch_script_uses_the_cli():
    script = (REPO_ROOT / "launch" / "multinode" / "train.sbatch").read_text()
    for flag in ("--launch.num_machines", "--launch.machine_rank", "--launch.main_process_ip", "tokensieve train"):
        assert flag in script


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_cpu_ddp_run(tiny_run_overrides, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "tokensieve", "train", "recipes/sft/lora_tiny.yaml",
               *tiny_run_overrides(output_dir, steps=3), "--launch.num_processes", "2", "--launch.profile", "cpu-ddp"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert (output_dir / "base_model" / "model.safetensors").is_file()
