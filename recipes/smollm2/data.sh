#!/usr/bin/env bash
# Training and validation rows for the SmolLM2-135M-Instruct recipes, made from the shipped real-prose corpus
# (data/text) with the prepared model's tokenizer: pass keys, four named keys (one asked), three facts (one asked)
# and language-modelling chunks whose last 256 tokens are the completion, all in ~1K-token prompts, training
# phrasings only (the test splits, made by the benchmarks, hold other phrasings out).
#   bash install.sh --real && tokensieve model prepare smollm2      # once: models/SmolLM2-135M-Instruct
#   bash recipes/smollm2/data.sh                                     # -> outputs/data/smollm2/*-1k
set -euo pipefail
cd "$(dirname "$0")/../.."
model=models/SmolLM2-135M-Instruct
out=outputs/data/smollm2
[[ -f "$model/config.json" ]] || { echo "no $model: run tokensieve model prepare smollm2 first" >&2; exit 1; }
for task in passkey named-keys facts; do
    tokensieve data make "$task" --out "$out/$task-1k" --n 400 --seed 1 --splits train,validation \
        --tokenizer "$model" --prompt_tokens 1024 >/dev/null
done
tokensieve data make lm-text --out "$out/lm-text-1k" --n 400 --seed 1 --splits train,validation \
    --tokenizer "$model" --prompt_tokens 1024 --completion_tokens 256 >/dev/null
echo "wrote $out/{passkey,named-keys,facts,lm-text}-1k"
