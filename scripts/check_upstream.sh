#!/usr/bin/env bash
# Upstream canary, for maintainers: will tokensieve work with what the package registries serve today?
# Builds a throwaway venv with the newest releases pyproject.toml allows (install.sh --latest), runs the default test
# suite, then one end-to-end gate run: a tiny base, a few TRIM-KV training steps, the export, and `tokensieve
# generate` / `tokensieve eval` from it in fresh processes. Prints the versions and what failed; exit status 1 if
# anything did. CI stays on requirements.lock: a landing never depends on what was released that morning.
#   bash scripts/check_upstream.sh                # report only
#   bash scripts/check_upstream.sh --write-lock   # and, if everything passed, rewrite requirements.lock from the venv
#   KEEP=1 bash scripts/check_upstream.sh         # keep the throwaway folder (its path is printed)
set -uo pipefail
cd "$(dirname "$0")/.."
write_lock=0
for arg in "$@"; do
    case "$arg" in
        --write-lock) write_lock=1 ;;
        *) echo "check_upstream.sh: unknown option $arg (expected --write-lock)" >&2; exit 2 ;;
    esac
done
work="$(mktemp -d "${TMPDIR:-/tmp}/tokensieve-upstream.XXXXXX")"
# Removed at the end unless KEEP=1, or something failed (its logs are kept and named then).
trap '[ "${KEEP:-0}" = 1 ] || [ ${#failed[@]} -gt 0 ] || rm -rf "$work"' EXIT
venv="$work/venv"
python="$venv/bin/python"
failed=()

echo "== install (newest releases) into $venv"
if ! VENV="$venv" bash install.sh --latest > "$work/install.log" 2>&1; then
    tail -20 "$work/install.log"
    echo "FAILED: install.sh --latest"
    exit 1
fi
"$python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|tokenizers|safetensors|deepspeed|wandb)==' \
    | sed 's/^/   /'

echo "== default test suite"
if ! "$python" -m pytest -q -p no:randomly 2>&1 | tee "$work/pytest.log" | tail -25; then
    failed+=("default test suite ($(grep -cE '^(FAILED|ERROR) ' "$work/pytest.log") failing; first: $(grep -m1 -E '^(FAILED|ERROR) ' "$work/pytest.log"))")
fi

echo "== gate export -> generate and eval in fresh processes"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
smoke() {
    "$python" - "$work/base" <<'PY' || return 1
import json, sys
from transformers import AutoModelForCausalLM
from tokensieve.launch.model import FromScratchArguments, build_config
from tokensieve.launch.tokenizer import build_tokenizer

rows = [json.loads(line) for line in open("data/tasks/mqar/train.jsonl", encoding="utf-8")][:200]
tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=600)
spec = FromScratchArguments(architecture="qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=64, max_position_embeddings=2048)
AutoModelForCausalLM.from_config(build_config(spec, tokenizer)).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
PY
    "$venv/bin/tokensieve" train recipes/tiny/trim_kv.yaml --model.name_or_path "$work/base" \
        --training.output_dir "$work/gates" --max_steps 3 --per_device_train_batch_size 4 --gate_intermediate_size 8 \
        --report_to none --save_strategy no || return 1
    "$venv/bin/tokensieve" generate "$work/gates" --prompt "$(head -1 data/tasks/mqar/test.jsonl | "$python" -c 'import json, sys; print(json.loads(sys.stdin.read())["prompt"])')" \
        --memory-size 16 --buffer-size 4 --max-new-tokens 4 || return 1
    "$venv/bin/tokensieve" eval "$work/gates" --data data/tasks/mqar/test.jsonl --max-examples 8 --memory-size 16 \
        --buffer-size 4 --output "$work/eval.json" || return 1
}
if ! smoke > "$work/smoke.log" 2>&1; then
    tail -25 "$work/smoke.log"
    failed+=("gate export -> generate / eval (log: $work/smoke.log)")
else
    echo "   ok"
fi

echo "== summary"
if [ ${#failed[@]} -eq 0 ]; then
    echo "everything passed on the newest releases"
    if [ "$write_lock" = 1 ]; then
        {
            echo "# The exact versions tokensieve's test suite passed on (Python $("$python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d))."
            echo "# install.sh installs from this file by default. Made by: bash scripts/check_upstream.sh --write-lock"
            "$python" -m pip freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]+)\+cpu$/\1/'
        } > requirements.lock.tmp && mv requirements.lock.tmp requirements.lock
        echo "requirements.lock rewritten: review the diff, then run CI on it"
    fi
    exit 0
fi
for item in "${failed[@]}"; do echo "FAILED: $item"; done
echo "logs kept in $work (pytest.log, smoke.log, install.log)"
[ "$write_lock" = 1 ] && echo "requirements.lock left as it was"
exit 1
