"""The import graph of the ``hawada`` package: no circle, and dependencies point downward only
(docs/DESIGN.md, "Layout").

The graph is read from the source with :mod:`ast` (nothing is imported), so it also covers
modules whose optional libraries are not installed. An edge ``a -> b`` is any ``import`` or
``from ... import`` in ``a`` naming ``b``, wherever it sits: a function-local import closes a
circle as surely as a top-level one, it only fails later. ``from p import x`` is an edge to
the module ``p.x`` when that is a module, else to ``p``. A submodule's implicit import of its
parent package is not an edge: a package's ``__init__`` re-exporting its submodules is how
packages are built, not a circle.
"""

from __future__ import annotations

import ast
import os

import hawada

ROOT = os.path.dirname(os.path.abspath(hawada.__file__))

# What each layer must never import (a prefix matches the package and its modules).
FORBIDDEN = {
    "hawada.core": (
        "hawada.adapters",
        "hawada.jobs",
        "hawada.data",
        "hawada.run",
        "hawada.config",
        "hawada.cli",
    ),
    "hawada.ops": ("hawada.core", "hawada.adapters", "hawada.jobs", "hawada.run"),
    "hawada.kernels": ("hawada.core", "hawada.ops", "hawada.adapters", "hawada.jobs", "hawada.run"),
    "hawada.adapters": ("hawada.jobs", "hawada.run", "hawada.cli"),
    "hawada.jobs": ("hawada.run", "hawada.cli"),
    "hawada.data": ("hawada.jobs", "hawada.run", "hawada.cli", "hawada.adapters"),
    # beside run: the run's meter lives here, so a runtime never reaches back into a run
    "hawada.runtimes": ("hawada.run", "hawada.jobs", "hawada.config", "hawada.cli"),
}


def _modules() -> dict[str, str]:
    """Dotted name -> path of every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[: -len(".py")]
            parts = rel.split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The longest prefix of ``name`` that is a package module (None outside the package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports``, over ``hawada`` only."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = os.path.basename(path) == "__init__.py"
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                r = _resolve(t, modules)
                if r is not None and r != mod:
                    graph[mod].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_the_package() -> None:
    g = import_graph()
    assert {"hawada", "hawada.run.optimize", "hawada.jobs", "hawada.jobs.base", "hawada.data.vision"} <= set(
        g
    )
    # function-local imports count: the CLI imports the run inside its commands
    assert "hawada.run" in g["hawada.cli"]
    # ``from hawada import _ext`` names the module, not the package
    assert "hawada._ext" in g["hawada.ops.slicing"] and "hawada" not in g["hawada.ops.slicing"]


def test_cycles_finds_a_planted_circle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_import_graph_has_no_cycle() -> None:
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import circles: {found}"


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(module, import)`` pairs that point up the layering."""
    return sorted(
        (m, t)
        for m, targets in graph.items()
        for layer, banned in FORBIDDEN.items()
        if _within(m, layer)
        for t in targets
        if any(_within(t, b) for b in banned)
    )


def test_dependencies_point_downward() -> None:
    bad = violations(import_graph())
    assert not bad, f"imports against the layering: {bad}"


def test_the_layering_check_sees_a_planted_violation() -> None:
    g = {
        "hawada.core.gates": {"hawada.ops.gates", "hawada.adapters.base"},
        "hawada.adapters.base": {"hawada.core"},
    }
    assert violations(g) == [("hawada.core.gates", "hawada.adapters.base")]
