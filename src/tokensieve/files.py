"""Writing files and folders so that a failed or interrupted run never leaves something half-written in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_atomically(path, write) -> Path:
    """Call `write(temporary path)` next to `path` (a file or a folder), then rename it to `path`, replacing what was
    there. On failure the temporary is removed and `path` is left as it was. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # a stale one from a killed run with the same pid
    try:
        write(tmp)
        if path.is_dir() and not path.is_symlink():  # os.replace cannot replace a non-empty folder
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path
