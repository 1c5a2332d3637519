"""LM heads shared by the benchmarks: dense, and a fixed FR-Spec-style subset.

Both end as EAGLE calls its draft head, ``log_softmax -> topk(TOP_K)``, and take an
optional ``body`` (embedding + layers): without one they score hidden states
``[..., H]`` (``bench_head.py``), with one they are a whole draft step
(``bench_draft_step.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TOP_K", "DenseHead", "SubsetHead"]

TOP_K = 10


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """``Linear(H, rows, bias=False)`` over ``weight`` itself (a parameter is shared as is)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta",
                       dtype=weight.dtype)
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(
        weight, requires_grad=False)
    return linear


class DenseHead(nn.Module):
    """``[body ->] Linear(H, V) -> log_softmax -> topk``; returns ``(values, token ids)``.

    Parameters
    ----------
    weight : [V, H] (a parameter, e.g. a tied embedding, is shared, not copied)
    body : module mapping the forward's inputs to hidden states ``[..., H]``, or None
    """

    def __init__(self, weight: torch.Tensor, body: Optional[nn.Module] = None):
        super().__init__()
        self.body = body
        self.lm_head = _frozen_linear(weight)

    def hidden(self, *inputs) -> torch.Tensor:
        return inputs[0] if self.body is None else self.body(*inputs)

    def forward(self, *inputs):
        return torch.topk(F.log_softmax(self.lm_head(self.hidden(*inputs)), dim=-1), TOP_K, dim=-1)


class SubsetHead(DenseHead):
    """FR-Spec: a compact head over a fixed id ``subset [S]``, top-k mapped back to token ids."""

    def __init__(self, weight: torch.Tensor, subset: torch.Tensor,
                 body: Optional[nn.Module] = None):
        super().__init__(weight[subset].detach().contiguous(), body)
        self.register_buffer("id_map", subset.clone())

    def forward(self, *inputs):
        values, index = super().forward(*inputs)
        return values, self.id_map[index]
