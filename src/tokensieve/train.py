"""Training entry point of one process: `python -m tokensieve.train RECIPE [--key value ...]`.

This is what `accelerate launch -m tokensieve.train RECIPE ...` runs on every rank; it ignores the recipe's
`launch:` section (use `tokensieve train` to have that section start the processes).
"""

import sys

from tokensieve.launch.cli import run_command

USAGE = "usage: python -m tokensieve.train RECIPE [--section.key value ...]"


def close_process_group() -> None:
    """Shut torch.distributed down before the interpreter exits. The Trainer never does; a rank that exits with its
    process group alive can abort at exit ("terminate called without an active exception", seen once in a two-process
    CPU run after training had finished)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    """Load the recipe and train in this process; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    debug = "--debug" in argv[:1]
    if debug:
        argv = argv[1:]

    def train():
        from tokensieve.launch.recipe import load_recipe
        from tokensieve.launch.run import run_training

        try:
            run_training(load_recipe(argv[0], argv[1:]))
        finally:
            close_process_group()
        return 0

    return run_command(train, debug)


if __name__ == "__main__":
    sys.exit(main())
