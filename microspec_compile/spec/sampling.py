"""Choosing tokens: the greedy argmax, or a draw at a temperature, for every loop.

The chain loop (``spec.chain``), the tree loops (``spec.eagle``, ``spec.lookup``) and
the tree's acceptance (``spec.tree.accept_sampling``) all choose through here, so a
seed means the same thing in each:

* probabilities are ``softmax(logits / temperature)`` in float64 (the acceptance
  ratios ``p / q`` and residuals ``max(p - q, 0)`` of speculative sampling are taken
  on them; float32 loses the small probabilities of a 262k-token vocabulary);
* a draw is made where the ``generator`` lives (a CPU generator: on the host, whatever
  device the logits are on), without one where the probabilities are, and returned on
  the probabilities' device.
"""
from __future__ import annotations

import torch

__all__ = ["probabilities", "draw", "uniform", "choose", "choose_token"]


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dim, float64, same shape."""
    return torch.softmax(logits.double() / temperature, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``probs [N, V]`` (or one of ``[V]``): ``[N]`` int64 (or ``[]``),
    drawn where ``generator`` lives, on ``probs``' device."""
    if generator is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    ids = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    return ids.squeeze(-1).to(probs.device)


def uniform(generator: torch.Generator | None = None) -> torch.Tensor:
    """A float64 draw from ``[0, 1)`` (0-dim), where ``generator`` lives (none: the host)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand((), generator=generator, dtype=torch.float64, device=device)


def choose(logits: torch.Tensor, sample: bool, temperature: float,
           generator: torch.Generator | None = None):
    """``(ids [N], probs [N, V] or None)`` from ``logits [N, V]``: the argmax per row
    (no probabilities), or a draw at ``temperature`` and the probabilities drawn from."""
    if not sample:
        return logits.argmax(-1), None
    probs = probabilities(logits, temperature)
    return draw(probs, generator), probs


def choose_token(logits_row: torch.Tensor, sample: bool, temperature: float,
                 generator: torch.Generator | None = None) -> int:
    """:func:`choose` for one row ``[V]``, as a Python int (the token after a prompt)."""
    ids, _ = choose(logits_row.view(1, -1), sample, temperature, generator)
    return int(ids[0])
