"""The "inductor" kernel path: the sparse-head ops as pure-aten decompositions.

Given to Inductor through ``compile_fx(gm, inputs, decompositions=...)``, the opaque
``microspec::sparse_topk`` / ``microspec::sparse_full`` calls are traced into their
reference math while AOTAutograd builds the graph: one ``mm`` over the compact buffer
(an extern BLAS / cuBLAS call, or a Triton mm template under max-autotune on GPU) and
a fused epilogue (bias gather, count mask, softmax / log-softmax, top-k, id mapping or
the full-vocabulary fill + scatter) that Inductor generates as one C++ / Triton kernel
family. The math is ``reference.compact_logits`` plus the reference epilogues, so the
numbers are the reference's up to Inductor's reassociation of the reductions.

Usage (the backend wires it under the kernel path ``"inductor"``)::

    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    table = {**select_decomp_table(), **decompositions()}
    compiled = compile_fx(gm, example_inputs, decompositions=table)

The ``path`` argument of the ops is ignored here: choosing this table is the choice
of implementation. The empty-vocabulary check of the eager ops (``count == 0`` raises)
is a data-dependent host check and is not part of the decomposition; a graph that can
run with an empty vocabulary gets the reference's output (-inf logits, NaN
probabilities) instead of an error.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops  # noqa: F401  (defines torch.ops.microspec)
from .reference import compact_logits, full_epilogue, normalize_scores, topk_epilogue


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


def _logits(hidden, rows, ids, count, bias) -> torch.Tensor:
    """``reference.compact_logits``; on CUDA fp16/bf16 through ``mm(..., out_dtype=fp32)``.

    The reference's ``rows.float()`` would make Inductor materialise an fp32 copy of
    the whole [CAP + 1, H] buffer on every call (3x the bytes of the GEMM itself); the
    out_dtype mm reads the half-precision rows once and accumulates in fp32 (cuBLAS
    extern or a Triton template). CPU has no ``mm.dtype`` kernel: the reference there.
    """
    # Same contract as the eager ops: an empty vocabulary is an error, never NaN
    # rows (a device-side assert: no host sync).
    torch._assert_async(count[0] > 0, "the microspec active vocabulary is empty")
    if hidden.device.type != "cuda" or hidden.dtype not in (torch.float16, torch.bfloat16):
        return compact_logits(hidden, rows, ids, count, bias)
    scores = torch.mm(hidden, rows.t(), out_dtype=torch.float32)
    if bias is not None:
        scores = scores + bias.float()[ids.clamp(max=bias.shape[0] - 1)]
    live = torch.arange(rows.shape[0], device=rows.device) < count
    return scores.masked_fill(~live, float("-inf"))


def sparse_topk_decomposition(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    normalize: str,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aten form of ``microspec::sparse_topk``.

    Parameters
    ----------
    hidden : [..., H]
    rows : [CAP + 1, H]
    ids : [CAP + 1] int64
    count : [1] int64
    bias : [V] or None
    k : int
    normalize : str
    path : str, ignored

    Returns
    -------
    values : [..., k] in ``hidden.dtype``
    token_ids : [..., k] int64
    """
    # sparse_topk_reference, with _logits for compact_logits.
    scores = normalize_scores(_logits(_flat(hidden), rows, ids, count, bias), normalize)
    values, token_ids = topk_epilogue(scores, ids, count, k, hidden.dtype)
    lead = hidden.shape[:-1]
    return values.reshape(*lead, k), token_ids.reshape(*lead, k)


def sparse_full_decomposition(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: Optional[torch.Tensor],
    vocab_size: int,
    normalize: str,
    path: str = "auto",
) -> torch.Tensor:
    """Aten form of ``microspec::sparse_full``.

    Parameters
    ----------
    hidden : [..., H]
    rows, ids, count, bias, normalize, path
        As in :func:`sparse_topk_decomposition`.
    vocab_size : int

    Returns
    -------
    [..., vocab_size] in ``hidden.dtype``
    """
    # sparse_full_reference, with _logits for compact_logits (its epilogue is out of
    # place: decompositions run under AOTAutograd's functionalization).
    scores = normalize_scores(_logits(_flat(hidden), rows, ids, count, bias), normalize)
    out = full_epilogue(scores, ids, vocab_size, normalize, hidden.dtype)
    return out.reshape(*hidden.shape[:-1], vocab_size)


def decompositions() -> dict:
    """``{OpOverload: python decomposition}`` for ``compile_fx(..., decompositions=)``.

    Returns
    -------
    dict
        ``torch.ops.microspec.sparse_topk.default`` and ``sparse_full.default`` mapped
        to :func:`sparse_topk_decomposition` / :func:`sparse_full_decomposition`.
        Merge it over ``torch._inductor.decomposition.select_decomp_table()``.
    """
    return {
        torch.ops.microspec.sparse_topk.default: sparse_topk_decomposition,
        torch.ops.microspec.sparse_full.default: sparse_full_decomposition,
    }


def compile_with_decompositions(gm: torch.fx.GraphModule, example_inputs):
    """``compile_fx`` with the sparse-head decompositions over Inductor's default table.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A graph calling the microspec head ops (e.g. the rewritten Dynamo graph).
    example_inputs : list of tensors

    Returns
    -------
    callable
        The Inductor-compiled graph (mm + fused epilogue, no opaque head op).
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), **decompositions()}
    return compile_fx(gm, example_inputs, decompositions=table)
