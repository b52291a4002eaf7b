"""Batched tokenization of plain-text prompt/completion datasets into the columns TRL's SFTTrainer uses.

TRL tokenizes one example at a time (about 900 rows/s on two CPU cores here); the fast tokenizer on
batches of rows is tens of times faster. The result has exactly the columns TRL builds itself,
`input_ids` and `labels` (-100 on the prompt when the loss is on completions only), so SFTTrainer treats
the dataset as already processed and skips its own per-row label pass. Conversational data is left to
TRL (it needs the chat template).
"""

from __future__ import annotations

import datasets
from trl.data_utils import common_prefix_length


def tokenize_prompt_completion(
    dataset: datasets.Dataset,
    tokenizer,
    completion_only_loss: bool = True,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Add `input_ids`, `completion_mask` and `labels` to a plain-text prompt/completion dataset (others kept).

    `labels` are -100 on prompt tokens when `completion_only_loss` (TRL's default for this format), else
    equal to `input_ids`. As in TRL, EOS is appended to the completion (unless it already ends with it), and
    the completion starts where the tokenized prompt and the tokenized prompt + completion first differ (a
    merge across the boundary moves it left).
    """
    eos = tokenizer.eos_token

    def encode(batch):
        # Special tokens (a BOS, where the tokenizer adds one) as TRL's own tokenization adds them.
        prompts = tokenizer(batch["prompt"])["input_ids"]
        texts = [p + (c if c.endswith(eos) else c + eos) for p, c in zip(batch["prompt"], batch["completion"])]
        full = tokenizer(texts)["input_ids"]
        masks, labels = [], []
        for prompt_ids, ids in zip(prompts, full):
            start = common_prefix_length(prompt_ids, ids)
            masks.append([0] * start + [1] * (len(ids) - start))
            labels.append([-100] * start + ids[start:] if completion_only_loss else list(ids))
        return {"input_ids": full, "completion_mask": masks, "labels": labels}

    return dataset.map(
        encode, batched=True, batch_size=batch_size, num_proc=num_proc, desc="Tokenizing prompt/completion"
    )
