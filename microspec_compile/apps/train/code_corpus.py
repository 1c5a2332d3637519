"""Raw Python code for an EAGLE head: documented functions of the Python standard library.

Code completion (HumanEval's stubs) is a raw-text continuation of a function's
signature and docstring, unlike the chat-templated ShareGPT text.  The standard
library of the running Python gives real, varied code of that shape without
touching any evaluation set: every module-level function or method with a
docstring and a body, cut into

    header = the module's first imports + the ``def`` line through the docstring
    body   = the rest of the function

Functions are listed in a fixed order (sorted files, then a seeded shuffle), so
disjoint slices (``skip``) feed disjoint uses.  Test suites, IDLE and demos are
left out.
"""
from __future__ import annotations

import ast
import random
import sysconfig
import textwrap
from pathlib import Path

import torch

from .corpus import Sequence

__all__ = ["stdlib_functions", "code_sequences"]

_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo",
               "__pycache__", "ensurepip"}
_MAX_IMPORTS = 3


def _source_files(root: Path) -> list[Path]:
    def keep(path: Path) -> bool:
        parts = path.relative_to(root).parts
        return not any(p in _SKIP_PARTS or p.startswith("test") for p in parts)

    return sorted(p for p in root.rglob("*.py") if keep(p))


def _module_functions(source: str) -> list[tuple[str, str]]:
    tree = ast.parse(source)
    lines = source.splitlines()
    imports = ["\n".join(lines[n.lineno - 1: n.end_lineno]) for n in tree.body
               if isinstance(n, (ast.Import, ast.ImportFrom))][:_MAX_IMPORTS]
    preamble = "\n".join(imports) + "\n\n\n" if imports else ""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno
        header = textwrap.dedent("\n".join(lines[node.lineno - 1: doc_end]) + "\n")
        indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
        body = "\n".join(line[indent:] for line in lines[doc_end: node.end_lineno]) + "\n"
        if body.strip():
            out.append((preamble + header, body))
    return out


def stdlib_functions(limit: int, skip: int = 0, seed: int = 0,
                     root: str | Path | None = None) -> list[tuple[str, str]]:
    """``(header, body)`` of documented standard-library functions (module docstring).

    Parameters
    ----------
    limit : at most this many functions
    skip : functions to skip first (disjoint slices for disjoint uses)
    root : the library to read (default: the running Python's standard library)
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    functions = []
    for path in _source_files(root):
        try:
            functions += _module_functions(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse is not training text
    random.Random(seed).shuffle(functions)
    return functions[skip: skip + limit]


def code_sequences(tokenizer, functions, max_len: int = 512,
                   max_prompt: int = 256) -> list[Sequence]:
    """Each function's header (raw text, no template) followed by its own body."""
    out = []
    for header, body in functions:
        prompt = tokenizer(header, add_special_tokens=False)["input_ids"]
        if len(prompt) > max_prompt:
            continue
        ids = (prompt + tokenizer(body, add_special_tokens=False)["input_ids"])[:max_len]
        if len(ids) > len(prompt) + 1:
            out.append(Sequence(torch.tensor(ids, dtype=torch.int64), len(prompt)))
    return out
