"""The three dataset formats TRL trains on, and row validation with one precise error per bad example.

Formats (the same precedence as TRL's SFTTrainer, which treats any row with a `prompt` as prompt-completion):
- `prompt_completion`: `prompt` + `completion`, both strings, or both lists of `{role, content}` messages;
- `messages`: a list of `{role, content}` messages with at least one non-empty assistant turn;
- `text`: one string per example.
Extra columns are left alone: later methods read per-token columns such as `token_weights`.
"""

from __future__ import annotations

from typing import Literal

from tokensieve.errors import DataError

Format = Literal["prompt_completion", "messages", "text"]

EXPECTED_COLUMNS = "'prompt' + 'completion', 'messages', or 'text'"


def detect_format(dataset, source: str = "dataset") -> Format:
    """Return the format of `dataset` from its column names; raise DataError when none fits.

    `source` names the file or hub dataset in the error message.
    """
    columns = list(dataset.column_names)
    if "prompt" in columns:
        if "completion" not in columns:
            raise DataError(
                f"{source}: has a 'prompt' column but no 'completion' column (columns found: {columns}). "
                "Prompt-completion data needs both; for a conversational dataset keep only 'messages' "
                "(e.g. `columns: [messages]`)."
            )
        return "prompt_completion"
    if "messages" in columns:
        return "messages"
    if "text" in columns:
        return "text"
    raise DataError(f"{source}: no recognisable format: columns found {columns}; expected {EXPECTED_COLUMNS}.")


def is_conversational(dataset, fmt: Format) -> bool:
    """True when examples are lists of messages (always for `messages`; for prompt-completion, judged on row 0)."""
    if fmt == "messages":
        return True
    return fmt == "prompt_completion" and len(dataset) > 0 and isinstance(dataset[0]["prompt"], list)


def validate_rows(dataset, fmt: Format, source: str = "dataset") -> None:
    """Check every example of `dataset` against `fmt`; raise DataError naming the first bad example.

    The message gives `source`, the 0-based example index, the field (down to `messages[2].content`) and what
    was expected.
    """
    if fmt == "text":
        for index, value in enumerate(_column(dataset, "text")):
            _check_text(value, source, index, "text")
    elif fmt == "messages":
        for index, value in enumerate(_column(dataset, "messages")):
            _check_conversation(value, source, index, "messages", need_assistant=True)
    elif fmt == "prompt_completion":
        conversational = is_conversational(dataset, fmt)
        rows = zip(_column(dataset, "prompt"), _column(dataset, "completion"))
        for index, (prompt, completion) in enumerate(rows):
            if conversational:
                _check_conversation(prompt, source, index, "prompt", need_assistant=False)
                _check_conversation(completion, source, index, "completion", need_assistant=True)
            else:
                _check_text(prompt, source, index, "prompt", allow_empty=True)
                _check_text(completion, source, index, "completion")
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _column(dataset, name: str) -> list:
    """One column as Python values, read in one slice (iterating a datasets Column goes row by row, ~20x slower)."""
    return dataset.select_columns([name]).with_format(None)[:][name]


def _fail(source: str, index: int, field: str, expected: str, value) -> None:
    raise DataError(f"{source}, example {index}, field '{field}': expected {expected}, got {_describe(value)}.")


def _describe(value) -> str:
    """A short description of a bad value for error messages."""
    if value is None:
        return "null (missing)"
    if isinstance(value, str):
        if not value.strip():
            return f"an empty string {value!r}"
        text = value if len(value) <= 40 else value[:40] + "..."
        return f"the string {text!r}"
    if isinstance(value, list) and not value:
        return "an empty list"
    text = repr(value)
    text = text if len(text) <= 60 else text[:60] + "..."
    return f"{type(value).__name__} {text}"


def _check_text(value, source: str, index: int, field: str, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        _fail(source, index, field, "a string", value)
    if not allow_empty and not value.strip():
        _fail(source, index, field, "a non-empty string", value)


def _check_conversation(value, source: str, index: int, field: str, need_assistant: bool) -> None:
    """A list of {role: str, content: str} dicts; with `need_assistant`, one or more non-empty assistant turns."""
    if not isinstance(value, list) or not value:
        _fail(source, index, field, "a non-empty list of {'role', 'content'} messages", value)
    has_assistant = False
    for turn, message in enumerate(value):
        where = f"{field}[{turn}]"
        if not isinstance(message, dict):
            _fail(source, index, where, "a message dict with 'role' and 'content'", message)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            _fail(source, index, f"{where}.role", "a role string such as 'user' or 'assistant'", role)
        if not isinstance(content, str):
            _fail(source, index, f"{where}.content", "a string", content)
        if role == "assistant":
            if not content.strip():
                _fail(source, index, f"{where}.content", "a non-empty assistant turn", content)
            has_assistant = True
    if need_assistant and not has_assistant:
        roles = [message.get("role") for message in value]
        raise DataError(
            f"{source}, example {index}, field '{field}': expected at least one 'assistant' turn, "
            f"got roles {roles}."
        )
