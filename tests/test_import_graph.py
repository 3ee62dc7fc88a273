"""The package's modules import one another without a circle.

Every import counts, wherever it is written: at module level, inside functions and classes, and under
``if TYPE_CHECKING:``. An import hidden inside a function to dodge a circle is still a circle a reader has to
keep in mind, so this test sees through it. Relative imports are resolved against the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gqla_compile

PACKAGE = "gqla_compile"
ROOT = Path(gqla_compile.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, its __init__.py the file)."""
    modules = {}
    for file in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *file.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    is_package = file.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the deepest module of the package that the dotted name names (a name imported from a module is the module)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, file, modules) for name, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring the modules)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return None


def test_the_walk_sees_every_kind_of_import():
    """The graph holds module-level, function-level and TYPE_CHECKING imports, resolved from relative form."""
    graph = import_graph()
    assert len(graph) > 40  # the whole package, subpackages included
    assert "gqla_compile.passes.match" in graph["gqla_compile.passes.context"]  # from .match import ...
    assert "gqla_compile.dims" in graph["gqla_compile.passes.match"]  # from ..dims import ...
    assert "gqla_compile.passes.detect" in graph["gqla_compile.pipeline"]
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_function_level_imports_are_seen(tmp_path):
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
              "def f():\n    from ..c import y\n    import gqla_compile.d\n")
    file = tmp_path / "a.py"
    file.write_text(source)
    modules = {"gqla_compile.p.a": file, "gqla_compile.p.b": file, "gqla_compile.c": file, "gqla_compile.d": file}
    assert imports_of("gqla_compile.p.a", file, modules) == {"gqla_compile.p.b", "gqla_compile.c", "gqla_compile.d"}
