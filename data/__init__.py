"""tokensieve.data: dataset loading, validation, and synthetic tasks.

The re-exports below load lazily so `import tokensieve.data.synthetic` (used by `tokensieve data make`) does not
pay for importing `datasets` and TRL.
"""

_EXPORTS = {"DataArguments": "loading", "load_splits": "loading", "detect_format": "formats"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"tokensieve.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tokensieve.data' has no attribute {name!r}")
