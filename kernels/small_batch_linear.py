"""``microspec::small_batch_linear``: a tall Linear over a few rows as ``(W @ x^T)^T`` on CPU.

Why: speculative decoding verifies ``gamma + 1`` tokens per target step, so the
target's LM head sees a handful of rows.  For that shape MKL's ``x @ W^T`` (what
``F.linear`` runs) costs twice a single row, while the transposed product
``W @ x^T`` streams the tall ``W`` once, like a matrix-vector product.  Measured
on the project's 2-core AMD EPYC (AVX2, torch 2.13 CPU, fp32), SmolLM2's head
``W = 49152 x 576`` (113 MB), medians:

==== ========================== ==========================
rows 1 thread: x@W^T / W@x^T    2 threads: x@W^T / W@x^T
==== ========================== ==========================
1    15.0 / 18.6 ms             15.7 / 16.4 ms
2    36.6 / 19.6 ms             35.2 / 11.2 ms
5    35.1 / 18.3 ms             41.7 / 14.9 ms
8    36.0 / 22.9 ms             50.2 / 22.1 ms
16   47.4 / 48.8 ms             68.8 / 33.3 ms
==== ========================== ==========================

Hence the op takes ``W @ x^T`` for ``2 <= rows <= max_rows`` fp32 CPU rows and
``F.linear`` otherwise (one row: a gemv is already the fastest).  It is meant
for tall weights only (``passes/small_batch_linear.py``): on all of SmolLM2's
decoder-layer weights (576 x 576 ... 1536 x 576, 425 MB) at 5 rows the gain was
about 10% (94-100 vs 106-112 ms, 1 thread), and a transposed output feeding the
next Linear made that one 2x slower (199-267 ms).  The two
products round differently (another summation order), so the rewrite is
opt-in.  The op is opaque to Inductor, so the choice is made per call on the
real row count, whatever the symbolic shapes; it costs ~0.14 ms of dispatch
(measured over 211 calls at one row).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def takes_transposed_path(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether ``small_batch_linear`` computes ``W @ x^T`` for these inputs."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.shape[1] == x.shape[-1] and 2 <= rows <= max_rows)


def small_batch_linear_reference(x, weight, bias=None):
    """The semantics: ``F.linear``. ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` -> ``[..., N]``."""
    return F.linear(x, weight, bias)


@torch.library.custom_op("microspec::small_batch_linear", mutates_args=())
def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       max_rows: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``W @ x^T`` when ``x`` has 2..``max_rows`` fp32 CPU rows."""
    if not takes_transposed_path(x, weight, max_rows):
        return F.linear(x, weight, bias)  # (also raises F.linear's own shape errors)
    out = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0]).contiguous()


@small_batch_linear.register_fake
def _(x, weight, bias, max_rows):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
