"""The package's shape: no import cycle (imports inside functions included), the core free of
the command line, and no class or function grown past what one reads at once."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zforcing_cli"
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its code: `from .x import y` names
    x.y when that is a module, else x; a package's __init__ runs before its modules, but that
    order is Python's, not an import this module makes."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
    return {module for module in found if module in MODULES and module != name}


def cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle through start, as the list of modules along it; None if there is none."""
    stack, seen = [(start, [start])], set()
    while stack:
        name, path = stack.pop()
        for imported in sorted(graph[name]):
            if imported == start:
                return path + [start]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, path + [imported]))
    return None


def test_the_walk_sees_the_imports():
    graph = {name: imported_modules(name) for name in MODULES}
    assert {"zforcing_cli.train", "zforcing_cli.runconfig", "zforcing_cli.update"} <= graph["zforcing_cli"] | graph["zforcing_cli.train"]
    assert "zforcing_cli.cli" in graph["zforcing_cli.bench.__main__"]  # an import inside a function counts
    # The walk finds a cycle where there is one.
    assert cycle_from("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_of_the_package_is_in_an_import_cycle():
    graph = {name: imported_modules(name) for name in MODULES}
    cycles = [cycle for cycle in map(lambda name: cycle_from(name, graph), sorted(graph)) if cycle]
    assert cycles == []


def test_the_core_never_imports_the_command_line():
    """Only cli/ and console.py speak to the terminal; the __main__ modules start the command."""
    allowed = {"zforcing_cli.console", "zforcing_cli.__main__", "zforcing_cli.bench.__main__"}
    for name in MODULES:
        if name.startswith("zforcing_cli.cli") or name in allowed:
            continue
        tree = ast.parse(MODULES[name].read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {"typer", "rich"} & {module.partition(".")[0] for module in names}, name
        assert not [module for module in imported_modules(name) if module.startswith("zforcing_cli.cli")], name


def test_the_benchmark_uses_only_the_trainers_public_api():
    public = set(importlib.import_module("zforcing_cli.update").__all__)
    for name in MODULES:
        if name.startswith("zforcing_cli.bench"):
            assert "zforcing_cli.train" not in imported_modules(name), name
            tree = ast.parse(MODULES[name].read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "update":
                    assert {alias.name for alias in node.names} <= public, name


def definitions():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


@pytest.mark.parametrize("kind, limit", [(ast.ClassDef, MAX_CLASS_LINES), ((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)],
                         ids=["classes", "functions"])
def test_no_class_or_function_is_too_long(kind, limit):
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name, node in definitions()
            if isinstance(node, kind) and node.end_lineno - node.lineno + 1 > limit]
    assert long == []
