"""The layering of the package, read from the imports of every module (function-level imports included):

    tokensieve (src/tokensieve: errors, files, upstream)   imports nothing of ours
    selectors/                                              the package root only
    data/, trainers/                                        selectors/ and the root, never launch/ or each other
    launch/ (and the entry points tokensieve.train, tokensieve.__main__)   anything

so the method math can be read (and reused) without the trainers, and the trainers without the launcher.
"""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"selectors": "selectors", "trainers": "trainers", "data": "data", "launch": "launch"}
ENTRY_POINTS = {"train", "__main__"}
ALLOWED = {
    "root": {"root"},
    "selectors": {"root", "selectors"},
    "data": {"root", "selectors", "data"},
    "trainers": {"root", "selectors", "trainers"},
    "launch": {"root", "selectors", "data", "trainers", "launch"},
}


def modules():
    """(layer, module name, path) of every module of the package."""
    for path in sorted((REPO_ROOT / "src/tokensieve").glob("*.py")):
        if path.stem not in ENTRY_POINTS:
            yield "root", f"tokensieve.{path.stem}", path
    for layer, folder in FOLDERS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            yield layer, ".".join(["tokensieve", layer, *parts]), path


def layer_of(name: str) -> str | None:
    """The layer of an imported `tokensieve...` module name (None: not ours)."""
    parts = name.split(".")
    if parts[0] != "tokensieve":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "root"


def imported(path: Path, module: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import, resolved against the module's package
                base = module.split(".")[: -node.level]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {n for n in names if layer_of(n)}


MODULES = list(modules())


def test_the_layering_is_read_from_every_module():
    layers = {layer for layer, _, _ in MODULES}
    assert layers == {"root", "selectors", "data", "trainers", "launch"}
    assert len(MODULES) > 40


@pytest.mark.parametrize("layer, module, path", MODULES, ids=[m for _, m, _ in MODULES])
def test_no_import_goes_up_or_sideways(layer, module, path):
    wrong = sorted(name for name in imported(path, module) if layer_of(name) not in ALLOWED[layer])
    assert not wrong, f"{path.relative_to(REPO_ROOT)} ({layer}) imports {wrong}: allowed are {sorted(ALLOWED[layer])}"


def test_the_check_would_catch_an_arrow_up(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from tokensieve.launch.export import save_gates\n")
    assert imported(source, "tokensieve.trainers.bad") == {"tokensieve.launch.export",
                                                           "tokensieve.launch.export.save_gates"}
    assert layer_of("tokensieve.launch.export") not in ALLOWED["trainers"]
