"""Command-line `--key value` pairs, shared by recipe overrides and task options (no heavy imports here)."""

from tokensieve.errors import RecipeError


def split_flags(tokens: list[str], what: str, example: str, error=RecipeError) -> list[tuple[str, str]]:
    """Turn ["--a.b", "1", "--c=x"] into [("a.b", "1"), ("c", "x")]; `what` and `example` word the errors."""
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise error(f"{what} {token!r}: expected --key value (e.g. {example})")
        key, sep, text = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens):
                raise error(f"{what} --{key}: missing value")
            text = tokens[i + 1]
            i += 1
        pairs.append((key, text))
        i += 1
    return pairs
