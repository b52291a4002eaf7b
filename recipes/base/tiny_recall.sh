#!/usr/bin/env bash
# The reproducible record of the tiny recall base model: data, training, exact match on the test splits.
#   bash recipes/base/tiny_recall.sh [--key value ...]   # extra arguments override the recipe
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export WANDB_MODE="${WANDB_MODE:-offline}"  # the W&B run is logged offline unless you say otherwise
start=$(date +%s)
# The induction warm-up grows its segments stage by stage: short segments form the induction circuit fast
# (attention finds the one matching token among few), the longer ones carry it to the recall tasks' lengths.
tokensieve data make induction --out outputs/data/induction-4-12 --n 4800 --seed 1 --min_words 4 --max_words 12 >/dev/null
tokensieve data make induction --out outputs/data/induction-8-24 --n 4800 --seed 2 --min_words 8 --max_words 24 >/dev/null
tokensieve data make induction --out outputs/data/induction-16-48 --n 3200 --seed 3 --min_words 16 --max_words 48 >/dev/null
tokensieve data make induction --out outputs/data/induction-16-64 --n 3200 --seed 4 >/dev/null
tokensieve data make mqar --out outputs/data/mqar --n 8000 >/dev/null
tokensieve data make needle-qa --out outputs/data/needle-qa --n 8000 >/dev/null
tokensieve train recipes/base/tiny_recall.yaml "$@"
trained=$(date +%s)
out=outputs/base/tiny_recall  # or the --output_dir given above
previous=""
for arg in "$@"; do [[ "$previous" == "--output_dir" ]] && out="$arg"; previous="$arg"; done
tokensieve eval "$out" --data data/tasks/mqar/test.jsonl --data data/tasks/needle-qa/test.jsonl \
    --output "$out/exact_match.json"
echo "data + training: $((trained - start)) s; with evaluation: $(( $(date +%s) - start )) s"
