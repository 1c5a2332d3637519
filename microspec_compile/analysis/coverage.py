"""Vocabulary-policy models: how often a policy's active set holds the next token.

Two replays of token streams, both pure numpy / Python (no model, no torch):

* :func:`simulate` (``bench/bench_coverage.py``): a request is alternating user /
  assistant turns; S starts as a pinned core, every token seen joins S after its
  position (context policies), and assistant positions are scored;
* :func:`lagged_coverage` (``bench/bench_coverage_model.py``): the paper's policy on
  a model's own generation, ``S_p = tokens[0 .. p-lag] U topk(target at 0 .. p-lag)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Stats", "simulate", "lagged_coverage"]


@dataclass
class Stats:
    """Coverage counters pooled over generated positions."""
    hits: int = 0
    positions: int = 0
    size_sum: int = 0
    size_max: int = 0

    def add(self, other: "Stats") -> None:
        self.hits += other.hits
        self.positions += other.positions
        self.size_sum += other.size_sum
        self.size_max = max(self.size_max, other.size_max)

    @property
    def coverage(self) -> float:
        return self.hits / self.positions if self.positions else float("nan")

    @property
    def mean_size(self) -> float:
        return self.size_sum / self.positions if self.positions else float("nan")


def simulate(segments: list[np.ndarray], core_mask: np.ndarray, use_context: bool = True) -> Stats:
    """Replay one request and count hits and active-set sizes.

    Parameters
    ----------
    segments : list of np.ndarray
        Integer token ids per turn; even indices are user turns (prompt, not
        scored), odd indices assistant turns (generated, scored).
    core_mask : np.ndarray
        bool ``[n_vocab]``; True for pinned tokens, always in S.
    use_context : bool
        Whether every token seen (prompt or generated) joins S after its position.

    Returns
    -------
    Stats
        ``hits``: generated positions whose token was in S before being added;
        ``size_sum`` / ``size_max``: |S| just before each generated position.
    """
    if not segments:
        return Stats()
    tokens = np.concatenate(segments).astype(np.int64, copy=False)
    scored = np.concatenate([np.full(len(s), k % 2 == 1) for k, s in enumerate(segments)])
    in_core = core_mask[tokens]
    core_size = int(core_mask.sum())
    if use_context:
        first = np.zeros(tokens.size, dtype=bool)
        first[np.unique(tokens, return_index=True)[1]] = True  # first occurrence of each id
        hit = ~first | in_core
        entering = first & ~in_core                              # tokens that grow S
        size = core_size + np.cumsum(entering) - entering        # |S| before position t
    else:
        hit = in_core
        size = np.full(tokens.size, core_size)
    hit, size = hit[scored], size[scored]
    return Stats(int(hit.sum()), int(scored.sum()), int(size.sum()), int(size.max(initial=0)))


def lagged_coverage(tokens: list[int], topk: np.ndarray, prompt_len: int, lag: int = 2,
                    core: tuple = ()):
    """Coverage of generated tokens by ``context U top-k`` known ``lag`` steps earlier.

    Parameters
    ----------
    tokens : prompt + generation, length T
    topk : [T, K] the target's top-K prediction at each position (for token t+1);
        K = 0 means the context-only policy
    prompt_len : number of prompt tokens (generation starts there)
    core : ids always active (a frequency core)

    Returns
    -------
    (hits, sizes) : per generated position, whether the token was in S and |S|
    """
    active: set[int] = set(core)
    hits, sizes = [], []
    known = 0  # positions 0 .. known-1 have entered S
    for p in range(prompt_len, len(tokens)):
        while known <= p - lag:
            active.add(tokens[known])
            active.update(topk[known].tolist())
            known += 1
        hits.append(tokens[p] in active)
        sizes.append(len(active))
    return hits, sizes
