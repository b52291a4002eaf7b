"""`tokensieve curate RECIPE`: the recipe's model, reference model and data, wired to `tokensieve.data.curation`."""

from __future__ import annotations

from trl.trainer.utils import add_fused_lm_head

from tokensieve.data.curation import curate
from tokensieve.data.loading import load_splits
from tokensieve.errors import RecipeError
from tokensieve.launch.model import load_model_and_tokenizer
from tokensieve.trainers.history import load_reference_model


def run_curation(recipe) -> dict:
    """`tokensieve curate`: load the recipe's model, reference and data, then curate (see `curate`)."""
    if recipe.model.from_scratch is not None:
        raise RecipeError(f"{recipe.path}: model: curate scores with a trained model; set model.name_or_path")
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    add_fused_lm_head(model)
    model.eval()
    reference = None
    if recipe.curate.reference_model and recipe.curate.scorer in ("excess_loss", "sstoken"):
        reference = load_reference_model(recipe.curate.reference_model, model, recipe.model.trust_remote_code)
    dataset = load_splits(recipe.data)["train"]
    return curate(dataset, model, tokenizer, recipe.curate, reference, model_name=recipe.model.name_or_path)
