"""The layers hold in the code: every import of every module under ``excp/`` and
``server/`` (function-level imports included) goes to its own component or to a lower
layer, never up and never sideways to another component of its layer.

core (the codec, the archive format, stores, chains, adapters, the workload) <- api
<- client, dcp, server, the bench and the demo <- cli. A new module belongs to no
component until it is named in ``LAYERS``, and this test says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("excp", "server")

# component: (layer, the modules it holds: a name covers the module and everything under it)
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "core": (0, ("excp.__init__", "excp.errors", "excp.bundle", "excp.codec", "excp.format", "excp.store",
                 "excp.chain", "excp.exact", "excp.place", "excp.sharded", "excp.adapters", "excp.workload",
                 "excp.cache", "excp.memory", "excp.units")),
    "api": (1, ("excp.api", "excp.target")),
    "client": (2, ("excp.client",)),
    "dcp": (2, ("excp.dcp",)),
    "server": (2, ("server",)),
    "bench": (2, ("excp.bench",)),
    "demo": (2, ("excp.demo",)),
    "cli": (3, ("excp.cli", "excp.cli_usage")),
}


def _module_name(path: Path) -> str:
    """``excp/store/__init__.py`` is ``excp.store``; a top-level package's own module keeps
    its ``__init__`` (``excp.__init__``), so that naming it does not name every module."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _component(module: str) -> str | None:
    """The component holding ``module``: the one naming it or its closest package."""
    best, length = None, -1
    for name, (_, prefixes) in LAYERS.items():
        for prefix in prefixes:
            holds = module == prefix or module.startswith(prefix + ".")
            if holds and len(prefix) > length:
                best, length = name, len(prefix)
    return best


def _resolve(name: str) -> str:
    """An imported top-level package is its ``__init__`` module."""
    return f"{name}.__init__" if name in PACKAGES else name


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of our own packages, at any depth;
    ``from excp import api`` imports the module ``excp.api``."""
    found = []
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in MODULES else base))
    return sorted((line, _resolve(name)) for line, name in found if name.split(".")[0] in PACKAGES)


def test_every_module_belongs_to_a_component() -> None:
    assert len(MODULES) > 50  # the walk found the code
    unplaced = sorted(m for m in MODULES if _component(m) is None)
    assert unplaced == [], f"name these modules' component in LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_stay_in_the_component(module: str) -> None:
    component = _component(module)
    assert component is not None, f"name {module}'s component in LAYERS"
    layer = LAYERS[component][0]
    wrong = []
    for line, imported in _imports(module, MODULES[module]):
        other = _component(imported)
        if other is None:
            wrong.append(f"line {line}: {imported} belongs to no component")
        elif other != component and LAYERS[other][0] >= layer:
            wrong.append(f"line {line}: {imported} ({other}, layer {LAYERS[other][0]})")
    assert wrong == [], f"{module} ({component}, layer {layer}) imports upward or sideways: {wrong}"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule itself: a core module importing the api inside a function is refused."""
    source = tmp_path / "chain.py"
    source.write_text("def f():\n    from excp import api\n    import excp.dcp.writer\n")
    imported = [name for _, name in _imports("excp.chain", source)]
    assert imported == ["excp.api", "excp.dcp.writer"]
    assert [LAYERS[_component(name)][0] for name in imported] == [1, 2]
