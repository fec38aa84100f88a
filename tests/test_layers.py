"""The package layers of docs/DESIGN.md hold: every import of an llmudf module (at module level
or inside a function) goes to its own layer or one below it, and connectors do not import each
other. Walks the source with `ast`, so it sees imports that never run in the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package name it installs as (pyproject's package-dir)
FOLDERS = {
    "llmudf": "llmudf",
    "connectors": "llmudf.connectors",
    "optimizer": "llmudf.optimizer",
    "engine": "llmudf.engine",
    "kernels": "llmudf.kernels",
}
# top to bottom; a module's layer is its longest matching prefix. Each layer may import
# itself and the layers listed after it in its "may import" set.
LAYERS = {
    "face": "llmudf",
    "connectors": "llmudf.connectors",
    "runtime": "llmudf.runtime",
    "optimizer": "llmudf.optimizer",
    "calls": "llmudf.calls",
    "engine": "llmudf.engine",
    "kernels": "llmudf.kernels",
}
MAY_IMPORT = {
    "face": {"face", "connectors", "runtime", "optimizer", "calls", "engine", "kernels"},
    "connectors": {"connectors", "runtime", "optimizer", "calls", "engine"},
    "runtime": {"runtime", "optimizer", "calls", "engine"},
    "optimizer": {"optimizer", "calls"},
    "calls": {"calls"},
    "engine": {"engine", "kernels"},
    "kernels": {"kernels"},
}
# modules of the face that every SQL-side layer may import (imports nothing of llmudf)
LEAVES = {"llmudf"}  # the package itself: lazy names only, see llmudf/__init__.py


def layer_of(module: str) -> str:
    matches = [name for name, prefix in LAYERS.items() if module == prefix or
               module.startswith(prefix + ".")]  # fmt: skip
    return max(matches, key=lambda name: len(LAYERS[name]))


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from llmudf import paths`: the names may be submodules
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "llmudf"]


MODULES = _modules()


def _real(name: str) -> str | None:
    """The llmudf module an import names (`llmudf.x.y` may be a name inside module x)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    layer = layer_of(module)
    wrong = []
    for line, name in _imports(module, MODULES[module]):
        target = _real(name)
        if target is None or target in LEAVES or target == module:
            continue
        target_layer = layer_of(target)
        same_connector = target.split(".")[:3] == module.split(".")[:3]
        if target_layer not in MAY_IMPORT[layer] or (
            layer == target_layer == "connectors" and not same_connector
        ):
            wrong.append(f"line {line}: {target} ({target_layer})")
    assert not wrong, f"{module} ({layer}) imports upward or sideways: {wrong}"


def test_the_table_covers_every_folder():
    assert {layer_of(m) for m in MODULES} == set(LAYERS)
