"""The package layout: selectors/ must never shadow the standard library's selectors module."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_stdlib_selectors_wins_from_repo_root():
    code = (
        "import subprocess, asyncio, selectors, sysconfig, pathlib\n"
        "stdlib = pathlib.Path(sysconfig.get_paths()['stdlib']).resolve()\n"
        "assert pathlib.Path(selectors.__file__).resolve().parent == stdlib, selectors.__file__\n"
        "import tokensieve.selectors\n"
        "print('ok', list(tokensieve.selectors.__path__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok") and "selectors" in result.stdout


def test_selectors_is_a_namespace_package():
    assert not (REPO_ROOT / "selectors" / "__init__.py").exists()
    assert not (REPO_ROOT / "src" / "tokensieve" / "__init__.py").exists()
