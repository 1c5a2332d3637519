"""The LM-head calls of an EAGLE-2 round: ``scorer(hidden [N, H]) -> (log-probs [N, k], ids [N, k])``.

* :class:`TopkScorer` over the full head: compile it with Inductor for the dense
  baseline, or with ``backend="microspec"`` to score only the active vocabulary
  (the graph is a lone head: the loop observes token ids itself);
* :class:`SubsetTopkScorer` over a fixed subset of rows (FR-Spec: the most frequent
  tokens), renormalised over the subset, ids mapped back to the vocabulary;
* :class:`PackedScorer`: a scorer whose fp32 CPU linears run prepacked for each row
  count it is called with (``linears.PackedLinears``): the dense head as fast as this
  project can make it on a CPU, the strong baseline;
* :func:`top_ids`: the target's top-k ids at many positions (the prompt's, which
  MicroSpec's policy adds to the vocabulary), in bf16 where the CPU has bf16 products.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..cpu import cpu_flags
from ..linears.packed import PackedLinears

__all__ = ["TopkScorer", "SubsetTopkScorer", "PackedScorer", "top_ids", "fast_bf16_products"]

# an LM-head weight's bf16 copy lives on the weight (as its vocabulary does):
# (weight._version when copied, copy)
_BF16_ATTR = "_microspec_bf16_copy"


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


class PackedScorer:
    """``scorer`` (eager) with its fp32 CPU linears packed for each of ``rows`` row counts.

    On CPU a plain fp32 product of a few rows can repack the whole weight per call:
    a head of SmolLM2's shape (49152 x 576, random weights) on an AMD EPYC with
    AVX512-BF16 took 20.0 ms for 4 rows with ``F.linear`` or Inductor and 4.2 ms packed by
    oneDNN (7.7 against 3.7 ms for 1 row).  ``PackedLinears`` times the kernels and keeps
    the fastest per row count; other row counts take the plain product.  Each packing
    holds a copy of the weights.
    """

    def __init__(self, scorer: nn.Module, rows: tuple[int, ...]):
        self.scorer = scorer
        self.packings = {r: PackedLinears(scorer, r) for r in sorted(set(rows))}

    def __call__(self, hidden: torch.Tensor):
        rows = hidden.numel() // hidden.shape[-1]
        with self.packings.get(rows) or contextlib.nullcontext():
            return self.scorer(hidden)


def fast_bf16_products(device: torch.device) -> bool:
    """Whether bf16 matrix products are native on ``device``: CUDA, or a CPU with
    AVX512-BF16 or AMX-BF16 (oneDNN emulates them elsewhere, slower than fp32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _bf16_copy(weight: torch.Tensor) -> torch.Tensor:
    version, copy = getattr(weight, _BF16_ATTR, (None, None))
    if copy is None or version != weight._version:  # made once; again if changed in place
        copy = weight.detach().to(torch.bfloat16)
        setattr(weight, _BF16_ATTR, (weight._version, copy))
    return copy


@torch.no_grad()
def top_ids(lm_head: nn.Module, hidden: torch.Tensor, k: int, rows: int = 256) -> torch.Tensor:
    """``[N, k]`` ids of the ``k`` highest scores of ``lm_head`` (``Linear(H, V)``) at each
    row of ``hidden [N, H]``, ``rows`` rows at a time.

    For the vocabulary's policy, never for choosing a token: where bf16 products are
    native (:func:`fast_bf16_products`) the scores are computed in bf16 from a copy of
    the weight made once (the prompt's 210 rows x 49152: 21 vs 97 ms in fp32 on an
    AMD EPYC with AVX512-BF16), so near-ties may rank otherwise than in fp32; that only
    changes which ids the vocabulary holds, and the target verifies every token.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be float features, got dtype {hidden.dtype}")
    if hidden.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, {weight.shape[1]}], got {list(hidden.shape)}")
    if fast_bf16_products(weight.device) and weight.dtype != torch.bfloat16:
        weight, hidden = _bf16_copy(weight), hidden.to(torch.bfloat16)
        bias = None if bias is None else bias.to(torch.bfloat16)
    else:
        hidden = hidden.to(weight.dtype)
    return torch.cat([torch.nn.functional.linear(chunk, weight, bias).topk(k, dim=-1).indices
                      for chunk in hidden.split(rows)])
