"""PRIOR's reference sequence: the prompt without its condition, then the same response tokens.

The reference model scores exactly the response tokens the trained model does; `token_scores.realign_reference`
moves its scores back onto the main sequence's positions. Used by the token-loss trainer and by curation.
"""

from __future__ import annotations

from tokensieve.errors import EXAMPLE_INDEX, DataError


def add_reference_inputs(dataset, tokenizer, prompt_column: str, dataset_name: str):
    """PRIOR's reference sequence: the prompt without its condition (`prompt_column`) + the same response tokens.

    Adds reference_input_ids and reference_labels (-100 on the reference prompt), so the reference model scores
    exactly the response tokens the trained model does.
    """
    if prompt_column not in dataset.column_names:
        raise DataError(f"{dataset_name} dataset: column '{prompt_column}' (the prompt without its condition, for "
                        f"the reference model) is missing; columns are {', '.join(dataset.column_names)}")

    def build(batch):
        ids, labels = [], []
        for i, (prompt, row_ids, row_labels) in enumerate(zip(batch[prompt_column], batch["input_ids"], batch["labels"])):
            if not isinstance(prompt, str):
                index = batch[EXAMPLE_INDEX][i] if EXAMPLE_INDEX in batch else "?"
                raise DataError(f"{dataset_name} dataset, example {index}: '{prompt_column}' must be a string")
            # At least one token before the response, so its first token is scored too.
            prompt_ids = tokenizer(prompt)["input_ids"] or [tokenizer.bos_token_id or tokenizer.eos_token_id]
            response = [t for t, label in zip(row_ids, row_labels) if label != -100]
            ids.append(prompt_ids + response)
            labels.append([-100] * len(prompt_ids) + response)
        return {"reference_input_ids": ids, "reference_labels": labels}

    return dataset.map(build, batched=True, desc=f"Building reference inputs of {dataset_name} dataset")
