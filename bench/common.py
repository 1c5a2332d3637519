"""The benchmarks' harness: result files, load recording, cache flushing, interleaved timing.

Each benchmark script is a setup (models, providers) plus one call of
:func:`interleaved_rounds`; rows go through :func:`append_rows`, which stamps them
with the date and :func:`machine_info` (``microspec_compile.analysis.results``,
shared with the demo). Results go to ``bench/results/`` unless
``$MICROSPEC_RESULTS_DIR`` names another folder.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Callable, Optional

import torch

from microspec_compile.analysis.results import (
    append_rows,
    loadavg,
    machine_info,
    percentiles,
    results_dir,
)

__all__ = ["append_rows", "loadavg", "machine_info", "percentiles", "results_dir", "Flusher",
           "interleaved_rounds", "mode_parser", "emit_table"]


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


def interleaved_rounds(fns: dict[str, Callable[[], object]], *, min_rounds: int,
                       max_rounds: Optional[int] = None, budget_s: float = 0.0,
                       rng: Optional[random.Random] = None, flush: Optional[Callable] = None,
                       setup: Optional[dict] = None, on_round: Optional[Callable] = None
                       ) -> dict[str, list[float]]:
    """Time every callable once per round, in a shuffled order each round (milliseconds).

    Parameters
    ----------
    fns : name -> callable with no arguments (the timed call)
    min_rounds, max_rounds, budget_s : at least ``min_rounds``; more while under
        ``budget_s`` seconds, at most ``max_rounds`` (default ``min_rounds``)
    rng : the shuffling generator (default ``random.Random(0)``)
    flush : called untimed before each timed call (e.g. a :class:`Flusher`)
    setup : name -> callable run untimed before that name's timed call
    on_round : called with the number of rounds done after each round (progress)

    Returns
    -------
    dict
        name -> list of per-call milliseconds, in round order.
    """
    rng = rng or random.Random(0)
    max_rounds = min_rounds if max_rounds is None else max_rounds
    setup = setup or {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            if name in setup:
                setup[name]()
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if on_round is not None:
            on_round(rounds)
    return samples


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
