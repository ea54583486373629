"""The import graph of ``grpo_lab``, ``ablations`` and ``bench`` has no cycle: arrows run one way, a registry
never imports what registers into it (the package ``__init__`` or the entry point imports the entries).

The graph is read from the source with ``ast``, not by importing: every ``import`` statement counts, at
module level or inside a function (a function-local import hides a cycle from the interpreter, not from the
design), except those under ``if TYPE_CHECKING:``, which never run. An import resolves to the deepest module
of these packages that it names (``from pkg import sub`` is ``pkg.sub`` when ``sub`` is a module, else
``pkg``'s ``__init__``, which counts as a module). Imports by string (``importlib.import_module``) are not
followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("grpo_lab", "ablations", "bench")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the packages (``__init__``: the package)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node in ``tree`` at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _type_checking_block(node):
            children = node.orelse
        stack.extend(children)


def _deepest(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """``{module: the modules of ``packages`` it imports}``."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(_deepest(alias.name, modules) for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the package that holds this module
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                targets.add(sub if sub in modules else _deepest(base, modules))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_a_cycle(graph, set(c)) for c in components]


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path from the component's first module back to itself, inside the component (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


# ---- the walker itself, on a made-up tree ------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_walker_finds_a_cycle_hidden_in_a_function_and_names_it(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/registry.py": "import os\n\ndef f():\n    from pkg import entries\n",
        "pkg/entries.py": "from pkg.registry import f\n",
        "pkg/leaf.py": "from . import registry\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.registry"] == {"pkg.entries"}
    assert graph["pkg.leaf"] == {"pkg.registry"}
    assert cycles(graph) == [["pkg.entries", "pkg.registry", "pkg.entries"]]


def test_the_walker_counts_an_init_and_skips_type_checking(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import x\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import y\nx = 1\n",
        "pkg/b.py": "from pkg import x\nfrom .sub.c import z\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import a\nz = 1\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": set(), "pkg.b": {"pkg", "pkg.sub.c"},
                     "pkg.sub": set(), "pkg.sub.c": {"pkg.a"}}
    assert cycles(graph) == []


# ---- the project ------------------------------------------------------------------------------------
def test_no_import_cycle():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_errors_is_a_leaf():
    """Importing ``grpo_lab.system.errors`` (as every module that raises a ``UserError`` does) loads
    nothing else of
    ours: the process control that entry points need lives in ``grpo_lab.system.entry``."""
    assert import_graph(ROOT)["grpo_lab.system.errors"] == set()
