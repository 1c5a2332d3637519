"""The benchmarks' LM heads: the library's scorers (``spec.scorers``) over a bare weight.

Both end as EAGLE calls its draft head, ``log_softmax -> topk(TOP_K)``, and take an
optional ``body`` (embedding + layers): without one they score hidden states
``[..., H]`` (``bench_head.py``), with one they are a whole draft step
(``bench_draft_step.py``, ``gpu_draft_step.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from microspec_compile.spec import SubsetTopkScorer, TopkScorer

__all__ = ["TOP_K", "DraftStep", "dense_head", "subset_head"]

TOP_K = 10


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """``Linear(H, rows, bias=False)`` over ``weight`` itself (a parameter is shared as is)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta",
                       dtype=weight.dtype)
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(
        weight, requires_grad=False)
    return linear


class DraftStep(nn.Module):
    """``scorer(body(*inputs))``: a draft's body, then its LM-head scorer."""

    def __init__(self, body: nn.Module, scorer: nn.Module):
        super().__init__()
        self.body = body
        self.scorer = scorer

    def forward(self, *inputs):
        return self.scorer(self.body(*inputs))


def _with_body(scorer: nn.Module, body: Optional[nn.Module]) -> nn.Module:
    return scorer if body is None else DraftStep(body, scorer)


def dense_head(weight: torch.Tensor, body: Optional[nn.Module] = None) -> nn.Module:
    """The full head over ``weight [V, H]`` (a parameter, e.g. a tied embedding, is shared,
    not copied): ``TopkScorer``, after ``body`` when given."""
    return _with_body(TopkScorer(_frozen_linear(weight), TOP_K), body)


def subset_head(weight: torch.Tensor, subset: torch.Tensor,
                body: Optional[nn.Module] = None) -> nn.Module:
    """FR-Spec: a compact head over the rows ``subset [S]`` of ``weight``, top-k mapped back
    to token ids (``SubsetTopkScorer``), after ``body`` when given."""
    return _with_body(SubsetTopkScorer(_frozen_linear(weight), subset, TOP_K), body)
