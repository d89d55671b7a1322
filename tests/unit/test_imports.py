"""The import graph of guidekit/ and adapters/: no circle, and the core never imports an adapter.

The graph is read from the source (the AST of every ``.py``), not from ``sys.modules``, so a
circle hidden by an import inside a function counts: the layers are expression -> compile ->
step/rows -> run -> attention -> adapters, and each module imports only from below.

Edges: every ``import`` / ``from ... import`` at any depth (module level, inside functions and
classes, inside ``try``), relative imports resolved. Importing ``a.b.c`` runs the ``__init__`` of
``a.b`` first, so it is an edge to that package too, unless the package contains the importer
(its ``__init__`` is already running when the importer runs). ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module; ``importlib.import_module("a.b")`` with a literal
name counts as ``import a.b``. Imports under ``if TYPE_CHECKING:`` are left out of
the circle check (they never run; annotations are strings here) but not of the adapter check.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: source folder -> the package name it is installed as (pyproject's package-dir)
PACKAGES = {"guidekit": "guidekit", "adapters": "guidekit.adapters"}
ADAPTERS = "guidekit.adapters"
#: not core: the bundled models, demo and sweep use the library (adapters included) like a user
NOT_CORE = ("guidekit.models",)


def module_files() -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under the source folders."""
    out: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _dynamic(node: ast.AST) -> ast.Import | None:
    """``importlib.import_module("x")`` / ``__import__("x")`` with a literal name, as an import."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    name = node.args[0].value
    if called in ("import_module", "__import__") and isinstance(name, str):
        return ast.Import(names=[ast.alias(name=name)])
    return None


def _imports(tree: ast.AST, typing_only: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement at any depth, with whether it sits under ``if TYPE_CHECKING``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing_only
        elif dynamic := _dynamic(node):
            yield dynamic, typing_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), typing_only)
        else:
            yield from _imports(node, typing_only)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(stmt: ast.stmt, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ours that running ``stmt`` inside ``importer`` may execute."""
    names: list[str] = []
    if isinstance(stmt, ast.Import):
        names = [alias.name for alias in stmt.names]
    elif isinstance(stmt, ast.ImportFrom):
        if stmt.level:
            base = importer.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (stmt.level - 1)]
            module = ".".join(base + ([stmt.module] if stmt.module else []))
        else:
            module = stmt.module or ""
        names = [module] + [f"{module}.{alias.name}" for alias in stmt.names]
    out: set[str] = set()
    for name in names:
        if name not in modules:
            continue
        out.add(name)
        # the packages above the imported module run first, except the importer's own
        own = set(_parents(importer)) | ({importer} if is_package else set())
        out.update(p for p in _parents(name) if p in modules and p not in own)
    out.discard(importer)
    return out


@functools.cache
def import_graph(typing_too: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of guidekit/ and adapters/ that it imports."""
    files = module_files()
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for stmt, typing_only in _imports(tree):
            if typing_only and not typing_too:
                continue
            edges |= _targets(stmt, name, path.name == "__init__.py", modules)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_whole_source() -> None:
    graph = import_graph()
    assert "guidekit.expr" in graph and "guidekit.adapters.diffusers" in graph
    assert "guidekit.compile" in graph["guidekit"]  # the package __init__'s re-exports
    # relative imports inside adapters/ resolve to guidekit.adapters.*
    assert any(m.startswith("guidekit.adapters._") for m in graph["guidekit.adapters.flow"])


def test_find_cycle_reports_a_circle_and_none_without() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_a_dynamic_import_of_a_literal_name_counts() -> None:
    tree = ast.parse("import importlib\nm = importlib.import_module('guidekit.expr')\n")
    found = [_targets(s, "guidekit.plan", False, {"guidekit.expr"}) for s, _ in _imports(tree)]
    assert {"guidekit.expr"} in found


def test_an_import_inside_a_function_and_a_package_init_count() -> None:
    tree = ast.parse("def f():\n    from guidekit.terms.base import Term\n")
    stmt = next(_imports(tree))[0]
    modules = {"guidekit", "guidekit.terms", "guidekit.terms.base", "guidekit.expr"}
    assert _targets(stmt, "guidekit.expr", False, modules) == {
        "guidekit.terms", "guidekit.terms.base",
    }
    # inside its own package the package's __init__ is already running: no edge to it
    assert _targets(stmt, "guidekit.terms.cfg", False, modules) == {"guidekit.terms.base"}


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail("import circle: " + " -> ".join(cycle))


def test_the_core_never_imports_an_adapter() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, targets in sorted(import_graph(typing_too=True).items())
        if not module.startswith(ADAPTERS) and not module.startswith(NOT_CORE)
        for target in sorted(targets)
        if target.startswith(ADAPTERS)
    ]
    assert not offenders, "the core imports an adapter:\n" + "\n".join(offenders)


def test_the_bundled_models_use_only_the_public_adapters() -> None:
    # guidekit.models uses the library as a user does: an adapter's private module is not
    # its API (the class-embedding CADS it once borrowed from one lives in the core now)
    offenders = [
        f"{module} imports {target}"
        for module, targets in sorted(import_graph(typing_too=True).items())
        if module.startswith(NOT_CORE)
        for target in sorted(targets)
        if target.startswith(ADAPTERS + "._")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_registry_imports_no_term() -> None:
    # terms register themselves; a registry that imported them would be a list to edit
    graph = import_graph(typing_too=True)
    assert not {
        t for t in graph["guidekit.registry"]
        if t.startswith(("guidekit.terms", "guidekit.combinators"))
    }
