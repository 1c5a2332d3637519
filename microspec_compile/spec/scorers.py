"""The LM-head calls of an EAGLE-2 round: ``scorer(hidden [N, H]) -> (log-probs [N, k], ids [N, k])``.

* :class:`TopkScorer` over the full head: compile it with Inductor for the dense
  baseline, or with ``backend="microspec"`` to score only the active vocabulary
  (the graph is a lone head: the loop observes token ids itself);
* :func:`shared_topk_scorer`: the same, compiled once per process for every head of
  one kind and ``k`` (:class:`TopkLogProbs` takes the head's weight as an argument),
  so that any number of decoders share one Dynamo cache entry, each binding its own
  vocabulary (:class:`VocabScorer`);
* :class:`SubsetTopkScorer` over a fixed subset of rows (FR-Spec: the most frequent
  tokens), renormalised over the subset, ids mapped back to the vocabulary;
* :class:`PackedScorer`: a scorer whose fp32 CPU linears run prepacked for each row
  count it is called with (``linears.PackedLinears``): the dense head as fast as this
  project can make it on a CPU, the strong baseline.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from ..linears.packed import PackedLinears
from ..vocab import using

__all__ = ["TopkScorer", "TopkLogProbs", "shared_topk_scorer", "VocabScorer",
           "SubsetTopkScorer", "PackedScorer"]


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


class TopkLogProbs(nn.Module):
    """``log_softmax(hidden @ weight.T + bias).topk(k)`` with the head's weight an argument:
    one compiled instance serves every head of its weight's shape (parameters keep
    static shapes under ``dynamic=True``)."""

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias=None):
        return torch.log_softmax(F.linear(hidden, weight, bias), dim=-1).topk(self.k, dim=-1)


@functools.cache
def _compiled_topk(backend: str, k: int, capacity: int | None):
    if backend == "microspec":
        import microspec_compile as ms

        # the vocabulary is bound per call (VocabScorer): none is given here
        return torch.compile(TopkLogProbs(k), backend=ms.backend(), dynamic=True)
    return torch.compile(TopkLogProbs(k), backend=backend, dynamic=True)


def shared_topk_scorer(lm_head: nn.Module, k: int, backend: str = "inductor", vocab=None):
    """``scorer(hidden [N, H]) -> (log-probs [N, k], ids [N, k])`` of ``lm_head`` (a
    ``Linear(H, V)``) through one compiled :class:`TopkLogProbs` per process and
    ``(backend, k, capacity)``: decoders in any number make no new Dynamo cache entries.

    Parameters
    ----------
    backend : ``"inductor"`` (the dense head) or ``"microspec"`` (sparse over ``vocab``)
    vocab : the ``ActiveVocab`` of ``lm_head.weight`` each call reads (``"microspec"`` only)
    """
    if backend == "microspec":
        if vocab is None or not vocab.belongs_to(lm_head.weight):
            raise ValueError("the microspec scorer needs an ActiveVocab of lm_head.weight")
        compiled = _compiled_topk(backend, k, vocab.capacity)
        return VocabScorer(compiled, lm_head, vocab)
    if vocab is not None:
        raise ValueError(f"a vocabulary goes with backend='microspec', not {backend!r}")
    return VocabScorer(_compiled_topk(backend, k, None), lm_head, None)


class VocabScorer:
    """``compiled(hidden, lm_head.weight, lm_head.bias)`` with ``vocab`` bound around the
    call (``microspec_compile.using``), or with none (a dense head)."""

    def __init__(self, compiled, lm_head: nn.Module, vocab=None):
        self.compiled, self.lm_head, self.vocab = compiled, lm_head, vocab

    def __call__(self, hidden: torch.Tensor):
        if self.vocab is None:
            return self.compiled(hidden, self.lm_head.weight, self.lm_head.bias)
        calls = counters["microspec"]
        before = calls["sparse_calls"] + calls["dense_fallback_calls"]
        with using(self.vocab):
            out = self.compiled(hidden, self.lm_head.weight, self.lm_head.bias)
        if calls["sparse_calls"] + calls["dense_fallback_calls"] == before:
            warn_ran_eagerly()  # Dynamo ran the module uncompiled (e.g. its recompile limit)
            calls["scorer_eager_calls"] += 1
        return out


@functools.cache
def warn_ran_eagerly() -> None:
    warnings.warn(
        "microspec: a decoder's LM-head call ran without the microspec backend (dense): Dynamo "
        "ran TopkLogProbs uncompiled, e.g. past torch._dynamo.config.recompile_limit with many "
        "(top_k, capacity) kinds of decoder in one process; raise that limit", stacklevel=3)


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
