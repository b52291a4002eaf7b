"""Batched tokenization of plain-text prompt/completion datasets into the columns TRL's SFTTrainer uses.

TRL tokenizes one example at a time (about 900 rows/s on two CPU cores here); the fast tokenizer on
batches of rows is tens of times faster. The result has exactly the columns TRL builds itself,
`input_ids` and `completion_mask` (1 on completion tokens, EOS included), so SFTTrainer treats the
dataset as already processed. Conversational data is left to TRL (it needs the chat template).
"""

from __future__ import annotations

import datasets
from trl.data_utils import common_prefix_length


def tokenize_prompt_completion(
    dataset: datasets.Dataset, tokenizer, num_proc: int | None = None, batch_size: int = 1000
) -> datasets.Dataset:
    """Add `input_ids` and `completion_mask` to a plain-text prompt/completion dataset (other columns kept).

    As in TRL, EOS is appended to the completion (unless it already ends with it), and the completion starts where the tokenized prompt and
    the tokenized prompt + completion first differ (a merge across the boundary moves it left).
    """
    eos = tokenizer.eos_token

    def encode(batch):
        # Special tokens (a BOS, where the tokenizer adds one) as TRL's own tokenization adds them.
        prompts = tokenizer(batch["prompt"])["input_ids"]
        full = tokenizer([p + (c if c.endswith(eos) else c + eos) for p, c in zip(batch["prompt"], batch["completion"])])["input_ids"]
        masks = []
        for prompt_ids, ids in zip(prompts, full):
            start = common_prefix_length(prompt_ids, ids)
            masks.append([0] * start + [1] * (len(ids) - start))
        return {"input_ids": full, "completion_mask": masks}

    return dataset.map(
        encode, batched=True, batch_size=batch_size, num_proc=num_proc, desc="Tokenizing prompt/completion"
    )
