"""The package's structure: imports flow one way, and modules and functions stay small enough to read.

Layers, from the ground up: utils; layers, data; models; weights; engine; viz; experiments; cli. Every module of
``nlnet`` is parsed (never imported), and each import of an ``nlnet`` module — at module level or inside a
function — is an edge. The tests fail on any cycle between modules, on any edge against the direction of the
layers, on a module over 600 lines and on a function over 80 lines (outside the allowlists below).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nlnet

PACKAGE = Path(nlnet.__file__).parent
MODULE_LINES = 600
FUNCTION_LINES = 80

# A package may import itself and the packages listed for it, nothing else.
ALLOWED = {
    "utils": set(),
    "layers": {"utils"},
    "data": {"utils"},
    "models": {"layers", "utils"},
    "weights": {"models", "layers", "utils"},
    "engine": {"models", "weights", "data", "layers", "utils"},
    "viz": {"engine", "models", "weights", "data", "layers", "utils"},
    "experiments": {"engine", "viz", "models", "weights", "data", "layers", "utils"},
    "cli": {"experiments", "engine", "viz", "models", "weights", "data", "layers", "utils"},
}

# Size exceptions, each with the reason it stands. Keys are paths relative to nlnet/ (and the function's name).
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[tuple[str, str], str] = {}

_SOURCES = sorted(PACKAGE.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The nlnet modules ``path`` imports, among ``modules``.

    ``from PKG import NAME`` is an edge to the module ``PKG.NAME`` when there is one (the submodule is what gets
    loaded) and to ``PKG`` otherwise; ``import a.b`` is an edge to ``a.b``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in modules else module)
    return found & modules


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in _SOURCES}
    graph = {}
    for name, path in files.items():
        # Importing a package one is part of (``from nlnet.layers import X`` inside nlnet/layers/) reads its
        # __init__, which Python has already started before the submodule: that is no cycle of logic.
        graph[name] = {m for m in _imports(path, name, set(files)) if not (m == name or name.startswith(m + "."))}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    # ``nlnet`` and ``nlnet.detection`` are public namespaces that re-export from every layer.
    return parts[1] if len(parts) > 1 and parts[1] != "detection" else "nlnet"


def test_resolver_follows_submodules_and_ignores_the_own_package() -> None:
    graph = _graph()
    assert "nlnet.layers.pairwise" in graph["nlnet.layers.nonlocal_block"]
    assert "nlnet.layers" not in graph["nlnet.layers.nonlocal_block"]
    assert "nlnet.layers.nonlocal_block" in graph["nlnet.layers"]


def test_every_import_follows_the_direction_of_the_layers() -> None:
    wrong = []
    for module, targets in _graph().items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue
        for target in targets:
            other = _layer(target)
            if other not in (layer, "nlnet") and other not in ALLOWED[layer]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", _SOURCES, ids=_relative)
def test_module_under_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MODULE_LINES or _relative(path) in LONG_MODULES, f"{lines} lines"


@pytest.mark.parametrize("path", _SOURCES, ids=_relative)
def test_functions_under_80_lines(path: Path) -> None:
    long = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # From ``def`` to the last line of the body, decorators excluded.
            lines = node.end_lineno - node.lineno + 1
            if lines > FUNCTION_LINES and (_relative(path), node.name) not in LONG_FUNCTIONS:
                long.append(f"{node.name} (line {node.lineno}): {lines} lines")
    assert not long, "\n".join(long)


def test_allowlists_name_what_exists() -> None:
    # An exception for a module or function that is gone (or already short) is stale and must be removed.
    sources = {_relative(p): p for p in _SOURCES}
    for relative in LONG_MODULES:
        assert len(sources[relative].read_text(encoding="utf-8").splitlines()) > MODULE_LINES, relative
    for relative, name in LONG_FUNCTIONS:
        tree = ast.parse(sources[relative].read_text(encoding="utf-8"))
        lengths = [
            node.end_lineno - node.lineno + 1
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
        ]
        assert lengths and max(lengths) > FUNCTION_LINES, (relative, name)
