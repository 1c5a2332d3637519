"""The library never imports its applications.

The library is ``microspec_compile`` less ``apps/`` (demo, CLI, measurement, model and data
loaders, training) and ``analysis/`` (what benches and the demo measure with).  Every import
of every library module, at module level or inside a function, is read from the sources with
``ast`` (nothing is imported) and resolved to a module path; none may fall under those two.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "microspec_compile"
APPLICATIONS = ("microspec_compile.apps", "microspec_compile.analysis")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> list[Path]:
    linked = [p for folder in ("kernels", "passes") for p in (PACKAGE_DIR / folder).glob("*.py")]
    paths = sorted({*PACKAGE_DIR.rglob("*.py"), *linked})  # rglob does not follow the links
    return [p for p in paths if not _module_name(p).startswith(APPLICATIONS)]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from x import y`` gives x and x.y)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_library_is_found():
    names = {_module_name(p) for p in library_modules()}
    assert {"microspec_compile.backend", "microspec_compile.spec.decoder",
            "microspec_compile.kernels.ops", "microspec_compile.passes.match_head",
            "microspec_compile.linears"} <= names
    assert not any(n.startswith(APPLICATIONS) for n in names)
    assert "microspec_compile.apps.demo" in imported_modules(PACKAGE_DIR / "apps" / "cli.py")


@pytest.mark.parametrize("path", library_modules(), ids=_module_name)
def test_library_module_imports_no_application(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith(APPLICATIONS))
    assert not bad, f"{_module_name(path)} imports {bad}"
