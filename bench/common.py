"""The benchmarks' harness: result files, load recording, cache flushing, argument modes.

Each benchmark script is a setup (models, providers) plus one call of
``microspec_compile.apps.measure.interleaved_rounds`` (the demo's interleaving too);
rows go through :func:`append_rows`, which stamps them with the date and
:func:`machine_info` (``microspec_compile.analysis.results``, shared with the demo).
Results go to ``bench/results/`` unless ``$MICROSPEC_RESULTS_DIR`` names another folder.
"""
from __future__ import annotations

import argparse

import torch

from microspec_compile.analysis.results import (
    append_rows,
    loadavg,
    machine_info,
    percentiles,
    results_dir,
)

__all__ = ["append_rows", "loadavg", "machine_info", "percentiles", "results_dir", "Flusher",
           "mode_parser", "emit_table", "record_failure"]


def mode_parser(doc: str, modes: dict[str, str]) -> argparse.ArgumentParser:
    """A parser with one exclusive ``--<mode>`` flag per entry of ``modes`` (name -> help).

    ``args.mode`` is the flag given, None if none; ``doc``'s first paragraph describes it.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    for name, help_text in modes.items():
        size.add_argument(f"--{name}", dest="mode", action="store_const", const=name,
                          help=help_text)
    return parser


class Flusher:
    """Evicts the last-level cache by writing a buffer (64 MiB by default) before a timed call.

    A draft's decoder layer runs between two head calls, so a warm cache would flatter
    the head; ``enabled=False`` (``--warm-cache``) makes calling it a no-op.
    """

    def __init__(self, enabled: bool = True, mib: int = 64):
        self.buf = torch.empty(mib * 2**20 // 4) if enabled else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.fill_(1.0)


def emit_table(lines: list[str], out=None) -> bool:
    """Print a GPU script's table, append it to ``out`` (a path, or None) and say whether
    every line passed (no line mentions a failure)."""
    from pathlib import Path

    text = "\n".join(lines)
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return not any("failed" in line.lower() for line in lines)


def record_failure(lines: list[str], label: str, error: Exception, args, width: int = 150) -> None:
    """Add ``label  failed: <type>: <first line>`` to a GPU script's table, so that one broken
    provider does not hide the others; with ``args.fail_fast`` print the table (to
    ``args.out`` too) and raise ``error``."""
    message = str(error).splitlines()[0][:width] if str(error) else ""
    lines.append(f"{label}  failed: {type(error).__name__}: {message}")
    if args.fail_fast:
        emit_table(lines, args.out)
        raise error
