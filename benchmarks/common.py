"""Shared pieces of the benchmark scripts: the run record, recipes run in-process, step timing, plots."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def environment(seeds=(0,)) -> dict:
    """What a reader needs to trust a number: the command, the machine, thread count, versions, seeds, the date.

    `seeds`: the training seeds of the runs (the tiny recipes' `seed: 0` unless a benchmark varies it).
    """
    import torch
    import transformers
    import trl

    return {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "seeds": list(seeds),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def environment_lines(env: dict) -> list[str]:
    return [f"Command: `{env['command']}`  ",
            f"Machine: {env['machine']}; device {env['device']}; torch threads {env['torch_threads']}; "
            f"versions {env['versions']}; seeds {env.get('seeds', [0])}; {env['date']}  "]


def run_recipe(recipe: str, overrides: list[str], callbacks=()):
    """Train as `recipe` (relative to the repository) says, with overrides, in this process; extra callbacks."""
    from tokensieve.launch.recipe import load_recipe
    from tokensieve.launch.run import run_training

    return run_training(load_recipe(REPO / recipe, overrides), callbacks)


def step_timer():
    """A TrainerCallback that records the wall time of every optimizer step in `.times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def median(self, skip: int = 3) -> float:
            return statistics.median(self.times[skip:] or self.times)

    return StepTimer()


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def training_step_cost(trainer, batch: dict, steps: int) -> dict:
    """Seconds per `trainer.training_step` (forward + backward; median of `steps` after one warm-up) and the memory a
    step adds on top of what was allocated before it: peak allocated on CUDA, peak resident set on CPU (meaningful
    only in a process of its own: the resident peak is the process's)."""
    import resource

    import torch

    cuda = torch.cuda.is_available() and trainer.args.device.type == "cuda"
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
    trainer.training_step(trainer.model, dict(batch))  # warm-up (allocator, kernels); compute_loss may pop keys
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.training_step(trainer.model, dict(batch))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "step_bytes": max(peak - before, 0)}


def finish(out: Path, name: str, lines: list[str], figure=None) -> None:
    """A benchmark's outputs: `name`.md (the table), `name`.png (the figure, if any) in `out`, the table on stdout."""
    if figure is not None:
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=100)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
