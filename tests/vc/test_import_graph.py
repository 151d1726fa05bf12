"""``longcat_vc`` has no import circle (read from the source with ``ast``): its modules form layers,
config < loading < lora < modules < dit < pipeline < cli (``dit`` also uses kv_cache and parallel).

Every import statement counts, also the ones inside functions (a lazy import is still a
dependency: it only hides the circle until the call), except those under ``if TYPE_CHECKING:``.
Importing ``a.b.c`` also runs the package ``a.b``'s ``__init__``, so that edge is added too
(except for packages that already contain the importer).
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _modules(pkg_dir: str, pkg: str) -> Dict[str, str]:
    """Dotted module name -> file, for every ``.py`` under ``pkg_dir`` (packages by ``__init__``)."""
    out = {}
    for d, _, files in os.walk(pkg_dir):
        rel = os.path.relpath(d, pkg_dir)
        prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(d, f)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
        or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(pkg_dir: str, pkg: str) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (see the module docstring)."""
    mods = _modules(pkg_dir, pkg)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        targets: List[str] = []
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
                continue
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for a in node.names:
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module.
                targets.append(f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src)
        for t in targets:
            while t and t not in mods:  # ``import a.b.c`` of a name inside a module
                t = t.rpartition(".")[0]
            if not t or t == mod:
                continue
            graph[mod].add(t)
            # Importing a.b.c runs a.b's __init__ (unless the importer lives inside a.b).
            parent = t.rpartition(".")[0]
            while parent and parent in mods:
                if not (mod == parent or mod.startswith(parent + ".")):
                    graph[mod].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_longcat_vc_has_no_import_cycle():
    graph = import_graph(os.path.join(ROOT, "longcat_vc"), "longcat_vc")
    # The walk sees the package (so an empty graph cannot pass): the DiT's known dependencies.
    assert {"longcat_vc.lora", "longcat_vc.kv_cache", "longcat_vc.modules.block"} <= graph["longcat_vc.dit"]
    assert "longcat_vc.lora" in graph["longcat_vc.modules.attention"]
    assert "longcat_vc.loading" in graph["longcat_vc.dit"]  # lazy (from_pretrained), still counted
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in longcat_vc: " + " -> ".join(cycle)


def test_cycle_finder_sees_lazy_and_package_circles(tmp_path):
    """The checker fails on the shapes of circle it is meant to catch."""
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from . import b\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .c import C\n    return C\n")  # lazy
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\nC = 2\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("import os\n")
    g = import_graph(str(pkg), "pk")
    assert find_cycle(g) is None, g  # TYPE_CHECKING import does not count
    (pkg / "c.py").write_text("def g():\n    from .a import A\n    return A\nC = 2\n")
    cyc = find_cycle(import_graph(str(pkg), "pk"))
    assert cyc is not None and set(cyc) == {"pk.a", "pk.b", "pk.c"}, cyc
    # ``from .. import name`` (not a submodule) is an import of the package __init__.
    (pkg / "c.py").write_text("C = 2\n")
    (pkg / "sub" / "d.py").write_text("from .. import A\n")
    (pkg / "a.py").write_text("from .sub.d import *\nA = 1\n")
    cyc = find_cycle(import_graph(str(pkg), "pk"))
    assert cyc is not None and "pk" in cyc and "pk.sub.d" in cyc, cyc
