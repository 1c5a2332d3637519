"""``torch.library`` custom ops of the sparse LM head and the vocabulary gather.

Three ops, each with a fake (meta) implementation so that Dynamo, AOTAutograd and
Inductor can trace them with symbolic shapes, and a device implementation:

``microspec::observe``      mutates the vocabulary state (adds unseen ids).
``microspec::sparse_topk``  top-k (argmax is k=1) over the active rows.
``microspec::sparse_full``  full-vocabulary logits / probabilities / log-probs.

The CPU implementations are the pure-torch references in ``reference.py``; on CUDA
the Triton kernels are used when available (``kernels.dispatch``). ``impl`` picks
an implementation explicitly: ``"auto"`` (per device), ``"torch"``, ``"triton"``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .reference import NORMALIZE_MODES

_LIB = "microspec"


def _check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"token ids must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.numel() and tokens.device.type == "cpu":
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")


@torch.library.custom_op(
    f"{_LIB}::observe", mutates_args=("rows", "ids", "member", "last_seen", "count", "step")
)
def observe(
    rows: torch.Tensor,
    ids: torch.Tensor,
    member: torch.Tensor,
    last_seen: torch.Tensor,
    count: torch.Tensor,
    step: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    pin: bool = False,
    impl: str = "auto",
) -> None:
    """Add unseen ``tokens`` to the vocabulary state in place (see ``observe_reference``)."""
    _check_tokens(tokens, weight.shape[0])
    if tokens.device != rows.device:
        tokens = tokens.to(rows.device, non_blocking=True)
    dispatch.observe(rows, ids, member, last_seen, count, step, weight, tokens, pin, impl)


@observe.register_fake
def _(rows, ids, member, last_seen, count, step, weight, tokens, pin=False, impl="auto"):
    return None


def _check_head_args(hidden: torch.Tensor, rows: torch.Tensor, normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if hidden.dim() < 1 or hidden.shape[-1] != rows.shape[1]:
        raise ValueError(
            f"hidden must be [..., {rows.shape[1]}] to match the head, got {list(hidden.shape)}"
        )
    if hidden.dtype != rows.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} does not match the head dtype {rows.dtype}")
    if hidden.device != rows.device:
        raise ValueError(f"hidden is on {hidden.device} but the head state is on {rows.device}")


def _check_not_empty(count: torch.Tensor) -> None:
    # An all-masked row would give NaN probabilities downstream (and NaN
    # comparisons can accept wrong draft tokens), so an empty vocabulary is an error.
    if count.device.type == "cpu":
        if int(count) == 0:
            raise ValueError(_EMPTY)
    else:
        torch._assert_async(count[0] > 0, _EMPTY)


_EMPTY = (
    "the microspec active vocabulary is empty: pin ids (pinned_ids=[eos_id]) or observe "
    "token ids before calling the head"
)


@torch.library.custom_op(f"{_LIB}::sparse_topk", mutates_args=())
def sparse_topk(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    normalize: str,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the active rows. Returns ``(values [N, k], token_ids [N, k] int64)``."""
    _check_head_args(hidden, rows, normalize)
    if not 1 <= k <= rows.shape[0] - 1:
        raise ValueError(f"k must be in [1, capacity={rows.shape[0] - 1}], got {k}")
    _check_not_empty(count)
    flat = hidden.reshape(-1, hidden.shape[-1])
    values, token_ids = dispatch.sparse_topk(flat, rows, ids, count, bias, k, normalize, impl)
    lead = hidden.shape[:-1]
    return values.reshape(*lead, k), token_ids.reshape(*lead, k)


@sparse_topk.register_fake
def _(hidden, rows, ids, count, bias, k, normalize, impl="auto"):
    shape = (*hidden.shape[:-1], k)
    return hidden.new_empty(shape), hidden.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::sparse_full", mutates_args=())
def sparse_full(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: Optional[torch.Tensor],
    vocab_size: int,
    normalize: str,
    impl: str = "auto",
) -> torch.Tensor:
    """Full-vocabulary output ``[N, vocab_size]``; inactive entries -inf (0 for softmax)."""
    _check_head_args(hidden, rows, normalize)
    _check_not_empty(count)
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = dispatch.sparse_full(flat, rows, ids, count, bias, vocab_size, normalize, impl)
    return out.reshape(*hidden.shape[:-1], vocab_size)


@sparse_full.register_fake
def _(hidden, rows, ids, count, bias, vocab_size, normalize, impl="auto"):
    return hidden.new_empty((*hidden.shape[:-1], vocab_size))
