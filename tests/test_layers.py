"""The package layers: every module's imports, read from its source, stay inside what its layer may use.

    client (SDK, CLI)       server (gRPC service)       training (offline)
         |                         \\                        /
    facetwin.v1 (proto)             facetwin.core (faces, bundle contract, models, files)

server and training sit side by side over core and never import each other; the client knows only the proto.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each installed package may import from facetwin (itself always).
ALLOWED = {
    "facetwin.v1": set(),
    "facetwin.core": set(),
    "facetwin.client": {"facetwin.v1"},
    "facetwin.server": {"facetwin.v1", "facetwin.core"},
    "facetwin.training": {"facetwin.core"},
}


def _packages() -> dict[str, Path]:
    """Package name -> folder, from pyproject.toml's package-dir table (what pip installs)."""
    table = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
    return {name: ROOT / folder for name, folder in re.findall(r'^"([\w.]+)" = "([\w/]+)"$', table, flags=re.M)}


def _layer(module: str) -> str:
    """The ALLOWED key a module belongs to: facetwin.server.backends.onnxruntime -> facetwin.server."""
    return ".".join(module.split(".")[:2])


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def facetwin_imports(path: Path, module: str) -> set[str]:
    """Every facetwin module that the file imports, at any depth (inside functions too), relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("facetwin.")}


def _modules() -> list[tuple[str, Path]]:
    modules = []
    for package, folder in _packages().items():
        for path in sorted(folder.glob("*.py")):
            modules.append((_module_name(package, folder, path), path))
    return modules


def test_every_package_has_a_layer():
    assert set(_packages()) - {"facetwin.server.backends"} == set(ALLOWED)


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_imports_stay_inside_the_layer(module, path):
    own = _layer(module)
    known = set(ALLOWED)
    wrong = sorted(name for name in facetwin_imports(path, module)
                   if _layer(name) in known and _layer(name) != own and _layer(name) not in ALLOWED[own])
    assert not wrong, f"{path.relative_to(ROOT)} ({own}) imports {wrong}: allowed are {sorted(ALLOWED[own]) or 'none'}"


def test_the_checker_sees_relative_function_level_and_aliased_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from ..core import bundle\n"
                      "def f():\n    import facetwin.training.train as t\n    from .errors import X\n")
    found = facetwin_imports(source, "facetwin.server.probe")
    assert {"facetwin.core", "facetwin.core.bundle", "facetwin.training.train", "facetwin.server.errors"} <= found
    package = tmp_path / "__init__.py"
    package.write_text("from .client import Client\n")
    assert "facetwin.client.client" in facetwin_imports(package, "facetwin.client")
