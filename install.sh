#!/usr/bin/env bash
# Set up tokensieve for development: a virtual environment in .venv with the package (editable) and its
# test and launch extras. On a machine without an NVIDIA GPU it pins the CPU build of torch
# (constraints-cpu.txt); with a GPU, the torch already installed (or pip's default build) is kept.
#   bash install.sh            # then: .venv/bin/python -m pytest
#   VENV=/path/to/env bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    constraints=(-c constraints-cpu.txt)
    echo "install.sh: no NVIDIA GPU found: using the CPU build of torch (constraints-cpu.txt)"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${constraints[@]}" -e ".[dev]"
"$venv/bin/python" -c "import torch, transformers, trl, peft; print('tokensieve ready: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
