"""`python -m tokensieve ...` is the `tokensieve` command line."""

import sys

from tokensieve.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
