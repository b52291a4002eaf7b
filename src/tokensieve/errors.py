"""Errors a user can cause. The CLI prints `str(error)` without a traceback and exits with status 2."""

EXAMPLE_INDEX = "example_index"  # a dataset row's index as loaded, kept in a column so messages can name the example


class TokensieveError(Exception):
    """Base class for user-caused errors (bad recipe, data, model path, command-line use)."""


class RecipeError(TokensieveError):
    """A recipe key, value or override is unknown, of the wrong type, or out of range."""


class DataError(TokensieveError):
    """A dataset file, split, column or example is missing or malformed."""


class ModelError(TokensieveError):
    """A model, tokenizer, adapter or checkpoint cannot be loaded as asked."""


class TrainingError(TokensieveError):
    """Training cannot go on as configured: e.g. the loss or a gate output became NaN or inf."""


def check_values(checks) -> None:
    """Raise ValueError("NAME must be EXPECTED, got VALUE") for the first failing (ok, name, expected, value) of a
    config's table of checks (the recipe loader reports it against the recipe key)."""
    for ok, name, expected, value in checks:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {value!r}")
