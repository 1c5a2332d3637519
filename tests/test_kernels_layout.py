"""The layout of ``kernels/``: no import cycles, and every op defined by ``ops.py`` alone.

The import graph is read from the sources with ``ast`` (nothing is imported): an edge
``a -> b`` for every import of module ``b`` of the package by module ``a``, at module
level or inside a function: ``from .b import x``, ``from . import b``,
``from microspec_compile.kernels.b import x``, ``from microspec_compile.kernels import b``,
``import microspec_compile.kernels.b``, and, in a module that calls
``importlib.import_module``, every string constant naming a module of the package
(``dispatch.py`` builds its module names from such constants).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
PACKAGE = "microspec_compile.kernels"


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(KERNELS.glob("*.py"))}


def _target(name: str, names: set[str]) -> str | None:
    """The package module ``name`` (``"x"``, ``"microspec_compile.kernels.x"``) denotes."""
    if name.startswith(PACKAGE + "."):
        name = name[len(PACKAGE) + 1:]
    name = name.split(".")[0]
    return name if name in names else None


def _imports(tree: ast.Module, names: set[str]) -> set[str]:
    found = set()
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(_target(node.module, names))
            elif (node.level == 1 and not node.module) or node.module == PACKAGE:
                found.update(_target(alias.name, names) for alias in node.names)  # from . import x
            elif node.module and node.module.startswith(PACKAGE + "."):
                found.add(_target(node.module, names))
            elif node.level > 1 and node.module and node.module.startswith("kernels"):
                found.add(_target(node.module[len("kernels") + 1:], names))  # from ..kernels.x
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(_target(alias.name, names))
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            dynamic |= called in ("import_module", "__import__")
    if dynamic:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(_target(node.value, names))
    found.discard(None)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of kernels/ it imports}`` for every ``kernels/*.py``."""
    modules = _modules()
    names = set(modules)
    return {name: _imports(tree, names) - {name} for name, tree in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
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


def test_the_graph_sees_every_kind_of_import():
    """The reader finds the edges it must (module level, ``from . import``, importlib)."""
    graph = import_graph()
    assert {"dispatch", "side_stream", "state", "reference"} <= graph["ops"]
    assert "ops" in graph["async_gather"] and "ops" in graph["inductor_head"]
    assert {"triton_observe", "triton_sparse_head", "cpu_head", "reference"} <= graph["dispatch"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_has_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle in kernels/: " + " -> ".join(cycle)


def test_importing_ops_alone_defines_every_op_with_its_fake():
    """In a fresh interpreter, ``microspec_compile.kernels.ops`` imported without the
    package's ``__init__`` (which imports the backend and more) defines every op of
    ``ops.OPS``, with its fake, all from ``ops.py``; nothing else defines a ``microspec``
    op on the way."""
    code = f"""
import importlib.machinery, sys, types
package = types.ModuleType("microspec_compile")  # a bare package: its __init__ does not run
package.__path__ = [{str(ROOT / "microspec_compile")!r}]
sys.modules["microspec_compile"] = package
import torch
import microspec_compile.kernels.ops as ops
assert ops.__name__ == "microspec_compile.kernels.ops"
assert sorted(ops.IMPLEMENTATIONS) == sorted(ops.FAKES) == sorted(ops.OPS)
for name in ops.OPS:
    assert hasattr(torch.ops.microspec, name), name
    qualname = f"microspec::{{name}}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), f"{{name}}: no fake"
    for fn in (ops.IMPLEMENTATIONS[name], ops.FAKES[name]):
        assert fn.__module__ == ops.__name__, (name, fn.__module__)
print(" ".join(sorted(torch.ops.microspec._dir)))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    from microspec_compile.kernels import ops

    assert done.stdout.split() == sorted(ops.OPS)
