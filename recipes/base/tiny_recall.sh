#!/usr/bin/env bash
# The reproducible record of the tiny recall base model: data, training, exact match on the test splits.
#   bash recipes/base/tiny_recall.sh [--key value ...]   # extra arguments override the recipe
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
start=$(date +%s)
tokensieve data make induction --out outputs/data/induction --n 22400 >/dev/null
tokensieve data make mqar --out outputs/data/mqar --n 9600 >/dev/null
tokensieve data make needle-qa --out outputs/data/needle-qa --n 16000 >/dev/null
tokensieve train recipes/base/tiny_recall.yaml "$@"
trained=$(date +%s)
tokensieve eval outputs/base/tiny_recall --data data/tasks/mqar/test.jsonl --data data/tasks/needle-qa/test.jsonl \
    --output outputs/base/tiny_recall/exact_match.json
echo "data + training: $((trained - start)) s; with evaluation: $(( $(date +%s) - start )) s"
