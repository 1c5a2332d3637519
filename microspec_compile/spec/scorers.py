"""The LM-head calls of an EAGLE-2 round: ``scorer(hidden [N, H]) -> (log-probs [N, k], ids [N, k])``.

* :class:`TopkScorer` over the full head: compile it with Inductor for the dense
  baseline, or with ``backend="microspec"`` to score only the active vocabulary
  (the graph is a lone head: the loop observes token ids itself);
* :class:`SubsetTopkScorer` over a fixed subset of rows (FR-Spec: the most frequent
  tokens), renormalised over the subset, ids mapped back to the vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["TopkScorer", "SubsetTopkScorer"]


class TopkScorer(nn.Module):
    """``log_softmax(lm_head(hidden)).topk(k)``: what EAGLE-2 asks of the LM head."""

    def __init__(self, lm_head: nn.Module, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.lm_head = lm_head
        self.k = k

    def forward(self, hidden: torch.Tensor):
        return torch.log_softmax(self.lm_head(hidden), dim=-1).topk(self.k, dim=-1)


class SubsetTopkScorer(nn.Module):
    """Top-``k`` over a fixed subset of the head's rows (a copy of those rows).

    Parameters
    ----------
    lm_head : the full head (``Linear(H, V)``, no bias)
    subset : [S] int64 token ids scored (e.g. the most frequent quarter)
    k : candidates per row
    """

    def __init__(self, lm_head: nn.Module, subset: torch.Tensor, k: int):
        super().__init__()
        vocab = lm_head.weight.shape[0]
        subset = torch.as_tensor(subset, dtype=torch.int64)
        if subset.numel() < k or int(subset.min()) < 0 or int(subset.max()) >= vocab:
            raise ValueError(f"the subset must hold >= k={k} ids in [0, {vocab})")
        self.register_buffer("weight", lm_head.weight.detach()[subset].clone())
        self.register_buffer("ids", subset.clone())
        self.k = k

    def forward(self, hidden: torch.Tensor):
        values, index = torch.log_softmax(hidden @ self.weight.t(), dim=-1).topk(self.k, dim=-1)
        return values, self.ids[index]
