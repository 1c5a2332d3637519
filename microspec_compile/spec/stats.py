"""Per-request measurements shared by the decoding loops."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["SpecStats", "finish", "seconds_since"]


@dataclass
class SpecStats:
    """Per-request measurements of one generation.

    Attributes
    ----------
    accepted : list of int
        Drafted tokens accepted at each target (verification) step, ``0..gamma``.
    draft_times, target_times : list of float
        Seconds of every single-token draft forward / every target decode step.
    covered, checked : int
        Emitted tokens that were in the draft's active vocabulary (snapshot taken
        after drafting, before verification) / emitted tokens checked.
    vocab_sizes : list of int
        Active-vocabulary size at each verification step.
    prefill_time, total_time, stats_time : float
        Seconds; ``total_time`` excludes ``stats_time`` (the coverage bookkeeping).
    new_tokens : int
        Tokens generated (after truncation to ``max_new_tokens`` / EOS).
    tree_sizes : list of int
        Nodes verified per target step (tree loops only).
    looked_up : list of bool
        Per verification, whether it verified a context-lookup chain rather than the
        draft's own tree (tree loops only; ``draft_times`` then holds the lookup).
    """

    accepted: list = field(default_factory=list)
    draft_times: list = field(default_factory=list)
    target_times: list = field(default_factory=list)
    covered: int = 0
    checked: int = 0
    vocab_sizes: list = field(default_factory=list)
    prefill_time: float = 0.0
    total_time: float = 0.0
    stats_time: float = 0.0
    new_tokens: int = 0
    tree_sizes: list = field(default_factory=list)
    looked_up: list = field(default_factory=list)

    def tokens_per_verification(self) -> float:
        """Mean tokens emitted per target verification (accepted drafts + 1)."""
        return (sum(self.accepted) + len(self.accepted)) / max(len(self.accepted), 1)


def seconds_since(start: float, device: torch.device) -> float:
    """Seconds from ``start`` (a ``time.perf_counter()``) until the work queued on
    ``device`` is done: on CUDA it synchronises first, else the clock would stop when the
    kernels are launched, not when they have run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def finish(ids: torch.Tensor, tokens: list, max_new: int, eos, stats, t0, t_stats=0.0):
    """Truncate ``tokens`` at ``max_new`` / EOS, close ``stats``; ``(prompt + tokens, stats)``
    on the prompt ``ids``' device."""
    tokens = tokens[:max_new]
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    stats.new_tokens = len(tokens)
    stats.stats_time = t_stats
    stats.total_time = time.perf_counter() - t0 - t_stats
    return torch.cat([ids[0], torch.tensor(tokens, dtype=ids.dtype, device=ids.device)]), stats
