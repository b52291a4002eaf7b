"""One training run in this process: recipe -> data -> model (+ LoRA) -> trainer -> checkpoint on disk."""

import os
from pathlib import Path

import yaml
from transformers import set_seed

from tokensieve.data.formats import detect_format, is_conversational
from tokensieve.data.loading import load_splits
from tokensieve.data.tokenize import tokenize_prompt_completion
from tokensieve.errors import ModelError, TokensieveError
from tokensieve.launch.methods import METHODS
from tokensieve.launch.model import apply_peft, load_model_and_tokenizer
from tokensieve.launch.recipe import Recipe
from tokensieve.upstream import checkpointing_enabled

BASE_MODEL_DIR = "base_model"  # where a from-scratch base is saved next to its LoRA adapter


def dataset_texts(dataset):
    """Yield every text of a prompt/completion, messages or text dataset (to train a tokenizer on)."""
    for row in dataset:
        for column in ("prompt", "completion", "text", "messages"):
            value = row.get(column)
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):  # conversational: a list of {"role", "content"} messages
                for message in value:
                    if isinstance(message, dict) and isinstance(message.get("content"), str):
                        yield message["content"]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N folder that was written to the end (its trainer_state.json is written last).

    A run killed while saving leaves a partial folder; resuming from it would fail, so it is skipped (and later
    overwritten when training saves that step again).
    """
    complete = [p for p in Path(output_dir).glob("checkpoint-*")
                if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    for path in Path(output_dir).glob("checkpoint-*"):
        if path.is_dir() and path not in complete:
            print(f"[tokensieve] skipping {path}: not written to the end (no trainer_state.json)", flush=True)
    return str(max(complete, key=lambda p: int(p.name.split("-", 1)[1]))) if complete else None


def resolve_checkpoint(training) -> str | None:
    """The checkpoint to resume from: "auto" means the last complete one in output_dir (None when there is none)."""
    value = training.resume_from_checkpoint
    if value in (None, ""):
        return None
    if value == "auto":
        return last_complete_checkpoint(training.output_dir) if os.path.isdir(training.output_dir) else None
    if not os.path.isdir(value):
        raise ModelError(f"training.resume_from_checkpoint: checkpoint folder not found: {value}")
    return value


def check_trackers(training) -> None:
    """Fail before any work when `report_to` asks for W&B and W&B cannot log in (its callback would only fail when
    training starts, after the data and model are loaded). Offline and disabled modes need no login."""
    if "wandb" not in (training.report_to or []):
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    try:
        import wandb
    except ImportError:
        raise TokensieveError("training.report_to includes wandb, which is not installed: pip install 'tokensieve[wandb]'"
                              " (or drop wandb from report_to)") from None
    try:
        wandb.login(verify=False)  # the key from WANDB_API_KEY or `wandb login`; prompts only on a terminal
    except wandb.errors.UsageError as error:
        raise TokensieveError(
            f"training.report_to includes wandb, but W&B cannot log in ({error}). Set WANDB_API_KEY or run "
            "`wandb login`; or set WANDB_MODE=offline to log to ./wandb; or drop wandb from report_to") from None


def run_training(recipe: Recipe, callbacks=()):
    """Train as `recipe` says, in the current process (or as one rank of an accelerate launch).

    `callbacks`: extra TrainerCallbacks (benchmarks time steps with one).
    Saves the final model (or LoRA adapter) and the tokenizer to training.output_dir and returns the
    trainer's TrainOutput (global_step, training_loss, metrics).
    """
    args = recipe.training
    if args.process_index == 0:  # the rank that logs
        check_trackers(args)
    set_seed(args.seed)  # the from-scratch initialisation and the LoRA init depend on it
    splits = load_splits(recipe.data)
    train_dataset, eval_dataset = splits["train"], splits.get("test")

    texts = dataset_texts(train_dataset) if recipe.model.from_scratch and not recipe.model.tokenizer_name_or_path else None
    model, tokenizer = load_model_and_tokenizer(recipe.model, texts)
    output_dir = Path(args.output_dir)
    is_main = args.process_index == 0
    if recipe.peft is not None:
        if recipe.model.from_scratch is not None and is_main:
            # A LoRA adapter is useless without its random base: keep the base next to it.
            model.save_pretrained(output_dir / BASE_MODEL_DIR)
            tokenizer.save_pretrained(output_dir / BASE_MODEL_DIR)
        model = apply_peft(model, recipe.peft)
        if recipe.model.from_scratch is not None:
            model.peft_config["default"].base_model_name_or_path = str((output_dir / BASE_MODEL_DIR).resolve())
        if checkpointing_enabled(args):
            model.enable_input_require_grads()  # checkpointed frozen embeddings need grads on their outputs

    if detect_format(train_dataset) == "prompt_completion" and not is_conversational(train_dataset, "prompt_completion"):
        # Same columns TRL would build, tokenized in batches (TRL goes one row at a time).
        completion_only = args.completion_only_loss is not False  # TRL's default (None) is on for this format
        with args.main_process_first(desc="tokenizing"):
            train_dataset = tokenize_prompt_completion(train_dataset, tokenizer, completion_only, args.dataset_num_proc)
            if eval_dataset is not None:
                eval_dataset = tokenize_prompt_completion(eval_dataset, tokenizer, completion_only, args.dataset_num_proc)

    # One line per rank, so multi-process runs show that every rank took part.
    print(f"[tokensieve] rank {args.process_index} of {args.world_size}: {recipe.method} on "
          f"{len(train_dataset)} training examples -> {output_dir}", flush=True)
    trainer = METHODS[recipe.method].build_trainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.raw, sort_keys=False), encoding="utf-8")
    result = trainer.train(resume_from_checkpoint=resolve_checkpoint(args))
    trainer.save_model(str(output_dir))  # the model or adapter and the tokenizer (processing_class)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    return result
