"""A draft token tree (EAGLE-2) and its acceptance by the target.

A tree of ``T`` nodes is stored in breadth-first order, parents before children, on
the host (the loops choose and walk it there; one transfer per round):

    tokens  [T] int64   node 0 is the root (the last token the target emitted)
    parents [T] int64   parent node of each node (-1 for the root)
    depths  [T] int64   0 for the root; a node at depth d sits at position n + d

Acceptance walks down from the root.  At node ``u`` the target's distribution
``p_u`` (its logits at ``u``'s tree position) judges ``u``'s children in turn:

* greedy: the child whose token is ``argmax p_u`` is accepted, if there is one;
* sampling (EAGLE's ``evaluate_posterior``, SpecInfer's multi-candidate rule): the
  children are deterministic draft candidates (``q = 1`` on the tried token), so
  child ``x`` is accepted with probability ``p(x)``; on rejection ``p(x) = 0`` and
  ``p`` is renormalised before the next sibling.  By induction the accepted child
  (or, when all are rejected, the bonus drawn from the residual) is distributed
  exactly as ``p_u``.

The walk stops at a node none of whose children is accepted; the bonus token is
then ``argmax p_u`` (greedy) or a draw from the residual (sampling).  Every emitted
token is therefore distributed as the target's own: the tree changes speed only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import draw, uniform

__all__ = ["DraftTree", "select_tree", "accept_greedy", "accept_sampling", "causal_mask"]


def causal_mask(past: int, rows: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Additive ``[1, 1, rows, past + rows]`` mask: row ``r`` sees the past and rows ``<= r``.

    ``device``: where the model runs (the loops always pass it; None: the default device).
    """
    allowed = torch.ones(rows, past + rows, dtype=torch.bool, device=device).tril(past)
    return _additive(allowed, dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed [T, S]`` bool as an additive ``[1, 1, T, S]`` mask on ``allowed``'s device."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@dataclass
class DraftTree:
    """Nodes of a draft tree in breadth-first order (layout in the module docstring)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor

    def __post_init__(self):
        t = self.tokens.numel()
        if self.parents.numel() != t or self.depths.numel() != t or t == 0:
            raise ValueError("tokens, parents and depths must have the same non-zero length")
        later = torch.arange(1, t, device=self.parents.device)
        if int(self.parents[0]) != -1 or bool((self.parents[1:] >= later).any()):
            raise ValueError("node 0 must be the root and every parent must come before its child")

    def __len__(self) -> int:
        return self.tokens.numel()

    def ancestors(self) -> torch.Tensor:
        """``[T, T]`` bool: ``[i, j]`` when node ``j`` is node ``i`` or one of its ancestors."""
        t = len(self)
        anc = torch.eye(t, dtype=torch.bool, device=self.parents.device)
        for i in range(1, t):
            anc[i] |= anc[int(self.parents[i])]
        return anc

    def attention_mask(self, past: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
        """Additive ``[1, 1, T, past + T]`` mask: each node sees the past and its ancestors,
        on ``device`` (the model's; None: the default device)."""
        allowed = torch.cat([torch.ones(len(self), past, dtype=torch.bool, device=device),
                             self.ancestors().to(device)], 1)
        return _additive(allowed, dtype)

    def position_ids(self, past: int) -> torch.Tensor:
        """``[1, T]`` positions: ``past + depth``."""
        return (self.depths + past).view(1, -1)

    def children(self) -> list[list[int]]:
        """Children of every node, in tree order."""
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for i in range(1, len(self)):
            kids[int(self.parents[i])].append(i)
        return kids

    def paths(self) -> list[list[int]]:
        """Root-to-leaf node lists (EAGLE's retrieve indices)."""
        kids = self.children()
        out = []
        for leaf in (i for i in range(len(self)) if not kids[i]):
            path = [leaf]
            while path[-1] != 0:
                path.append(int(self.parents[path[-1]]))
            out.append(path[::-1])
        return out


def select_tree(root_token: int, tokens: torch.Tensor, parents: torch.Tensor,
                scores: torch.Tensor, depths: torch.Tensor, total_tokens: int) -> DraftTree:
    """Keep the best ``total_tokens - 1`` candidates (and the root) as a tree.

    Parameters
    ----------
    root_token : the tree's root
    tokens, parents, scores, depths : [C] candidates; ``parents`` index candidates (-1:
        the root), ``scores`` are cumulative log-probabilities (a child never scores
        above its parent, and ties go to the shallower node, so ancestors stay in)
    total_tokens : nodes of the tree, root included
    """
    if total_tokens < 1:
        raise ValueError(f"total_tokens must be >= 1, got {total_tokens}")
    keep_n = min(total_tokens - 1, tokens.numel())
    tok, par, sc, dep = tokens.tolist(), parents.tolist(), scores.tolist(), depths.tolist()
    order = sorted(range(len(tok)), key=lambda c: (-sc[c], dep[c], c))
    kept = set(order[:keep_n])
    for c in list(kept):  # a parent outside the kept set cannot happen, but never emit an orphan
        p = par[c]
        while p >= 0 and p not in kept:
            kept.add(p)
            p = par[p]
    nodes = sorted(kept, key=lambda c: (dep[c], -sc[c], c))
    index = {c: i + 1 for i, c in enumerate(nodes)}
    return DraftTree(torch.tensor([root_token] + [tok[c] for c in nodes], device="cpu"),
                     torch.tensor([-1] + [index.get(par[c], 0) for c in nodes], device="cpu"),
                     torch.tensor([0] + [dep[c] for c in nodes], device="cpu"))


def accept_greedy(tree: DraftTree, target_ids: torch.Tensor) -> tuple[list[int], int]:
    """Longest root-to-leaf path whose tokens equal the target's argmax.

    Parameters
    ----------
    target_ids : [T] the target's argmax at every tree node

    Returns
    -------
    (path, bonus): accepted node indices from the root (root included), and the
    target's token after the last of them
    """
    kids = tree.children()
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        want = int(target_ids[node])
        nxt = next((c for c in kids[node] if tokens[c] == want), None)
        if nxt is None:
            return path, want
        node = nxt
        path.append(node)


def accept_sampling(tree: DraftTree, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Multi-candidate speculative sampling down the tree (see the module docstring).

    Parameters
    ----------
    target_probs : [T, V] the target's (temperature-scaled) distribution at every node, on
        the host, like ``generator`` (the draws are made there)

    Returns
    -------
    (path, bonus) as :func:`accept_greedy`; every emitted token is distributed as
    the target's
    """
    kids = tree.children()
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        p = target_probs[node].double().clone()
        accepted = None
        for child in kids[node]:
            x = tokens[child]
            if uniform(generator) < p[x]:
                accepted = child
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:  # the candidates held all of p's mass: nothing left to draw
                break
            p /= total
        if accepted is None:
            if p.sum() <= 0:
                p = target_probs[node].double()
            return path, int(draw(p, generator))
        node = accepted
        path.append(node)
