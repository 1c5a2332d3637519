"""Pure-torch reference implementations of the two hot paths.

These functions define the semantics every other implementation (the CPU ops, the
Triton kernels, the Inductor lowering) is tested against. They are written without
host synchronisation (no ``.item()``, ``.tolist()``, ``nonzero()``, no Python value
written into a tensor element), so on CUDA they are also a valid, capturable fallback;
``tests/test_device_guards.py`` runs them under a guard that rejects each of these.

The state layout is ``kernels/state.py`` (``VocabState``).
"""
from __future__ import annotations

import torch

from .state import PINNED, VocabState

__all__ = ["PINNED", "NORMALIZE_MODES", "observe_reference", "compact_logits",
           "normalize_scores", "fill_value", "topk_epilogue", "full_epilogue",
           "sparse_topk_reference", "sparse_full_reference"]
NORMALIZE_MODES = ("none", "softmax", "log_softmax")


def observe_reference(
    state: VocabState,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    pin: bool = False,
) -> None:
    """Add the unseen ``tokens`` to the active vocabulary, in place.

    Parameters
    ----------
    state : VocabState
        The state tensors (layout in ``kernels/state.py``); updated in place.
    weight : [V, H]
        The full LM-head weight; only the rows of new tokens are read.
    tokens : any shape, integer, on the state's device
        Token ids; duplicates and ids already present are allowed. Ids outside
        ``[0, V)`` are ignored, on the device (checking them would need a host read:
        ``ops.check_tokens`` checks host tensors, off the hot path).
    pin : bool
        Mark these tokens as pinned (never evicted).

    Notes
    -----
    All tokens of one call count as equally recent. Present tokens get their
    last-seen step refreshed. New tokens go to free rows first (in row order), then
    replace the rows that are neither pinned nor touched by this call, in order of
    ``(last_seen, token id)``: the least recently observed first, the lower id on
    ties. The order depends on ids and steps only, never on rows, so every kernel and
    device that sees the same calls holds the same ids (``tests/test_kernels.py``). If
    one call brings more new tokens than free plus evictable rows, the ones that occur
    latest in ``tokens`` win (the same outcome as observing them one by one).
    """
    rows, ids, member, last_seen, count, step = state
    cap = rows.shape[0] - 1
    vocab = member.shape[0] - 1
    flat = tokens.reshape(-1).to(torch.int64)
    n = flat.numel()
    step.add_(1)
    if n == 0:
        return
    flat = torch.where((flat >= 0) & (flat < vocab), flat, vocab)  # out of range: scratch V
    stamp = torch.full_like(step, PINNED) if pin else step.clone()
    now = stamp.expand(n)

    # Deduplicate without a host sync: sort by token, keep each token's last
    # occurrence (stable sort keeps positions ascending inside a group).
    sorted_tok, order = torch.sort(flat, stable=True)
    is_last = torch.ones(n, dtype=torch.bool, device=flat.device)
    is_last[:-1] = sorted_tok[1:] != sorted_tok[:-1]
    present_slot = member[sorted_tok]
    present = is_last & (present_slot >= 0)
    new = is_last & (present_slot < 0) & (sorted_tok < vocab)

    # Refresh present tokens first so that eviction below cannot pick them.
    # A pinned row stays pinned. Scratch entries are reset with fills (views), never by
    # writing a Python scalar into an element: on CUDA that is a blocking host copy and
    # illegal in CUDA-graph capture.
    touch_slot = torch.where(present, present_slot, cap)
    kept = last_seen[touch_slot]
    last_seen.index_put_((touch_slot,), torch.where(kept == PINNED, kept, now))
    last_seen[cap:].zero_()

    # Candidate rows, best first: free rows in index order, then unpinned rows that
    # this call did not touch by (last_seen, token id): sorted by id, then stably by key.
    slot_index = torch.arange(cap, device=rows.device)
    free = slot_index >= count
    live_ls = last_seen[:cap]
    key = torch.where(free, slot_index - cap - 1, live_ls)
    evictable = free | (live_ls < step)
    key = torch.where(evictable, key, PINNED)
    by_id = torch.argsort(ids[:cap], stable=True)
    candidates = by_id[torch.argsort(key[by_id], stable=True)]
    available = evictable.sum()

    # New tokens in order of (last) occurrence; the latest `available` of them win.
    new_pos = torch.where(new, order, -1)
    by_pos = torch.argsort(new_pos, stable=True)  # non-new (-1) come first
    n_new = new.sum()
    rank = torch.arange(n, device=flat.device) - (n - n_new)  # 0.. among new tokens
    start = (n_new - available).clamp(min=0)
    keep = rank >= start
    cand_index = (rank - start).clamp(min=0, max=cap - 1)
    dest = torch.where(keep, candidates[cand_index], cap)
    new_tok = torch.where(keep, sorted_tok[by_pos], vocab)

    # Evict: the old owners of the destination rows leave the membership table.
    old_tok = torch.where(dest < cap, ids[dest], vocab)
    member.index_put_((old_tok,), torch.full_like(old_tok, -1))
    member.index_put_((new_tok,), dest)
    member[vocab:].fill_(-1)
    ids.index_put_((dest,), new_tok)
    ids[cap:].fill_(vocab)
    rows.index_copy_(0, dest, weight[new_tok.clamp(max=vocab - 1)].to(rows.dtype))
    last_seen.index_put_((dest,), now)
    last_seen[cap:].zero_()
    n_free = (cap - count).clamp(min=0)
    count.add_(torch.minimum(keep.sum(), n_free))


def compact_logits(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Logits over the compact rows, ``-inf`` past ``count``.

    Parameters
    ----------
    hidden : [N, H]
    rows : [CAP + 1, H]
    ids : [CAP + 1] int64
    count : [1] int64
    bias : [V] or None
        The full head bias; gathered through ``ids``.

    Returns
    -------
    [N, CAP + 1] tensor in fp32 (accumulation dtype).
    """
    scores = hidden.float() @ rows.float().t()
    if bias is not None:
        vocab = bias.shape[0]
        scores = scores + bias.float()[ids.clamp(max=vocab - 1)]
    live = torch.arange(rows.shape[0], device=rows.device) < count
    return scores.masked_fill(~live, float("-inf"))


def normalize_scores(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """``scores [N, C]`` as they are, softmax-ed or log-softmax-ed over the last dim."""
    if normalize == "softmax":
        return torch.softmax(scores, dim=-1)
    if normalize == "log_softmax":
        return torch.log_softmax(scores, dim=-1)
    if normalize == "none":
        return scores
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")


def fill_value(normalize: str) -> float:
    """What inactive entries hold: 0 for probabilities, ``-inf`` for (log-)scores."""
    return 0.0 if normalize == "softmax" else float("-inf")


def topk_epilogue(scores, ids, count, k: int, dtype: torch.dtype):
    """Top-k of normalised compact ``scores [N, CAP + 1]`` with ids mapped back.

    Returns
    -------
    values : [N, k] in ``dtype``
    token_ids : [N, k] int64; -1 where the index is past ``count``
    """
    values, index = torch.topk(scores, k, dim=-1)
    token_ids = ids[index].masked_fill(index >= count, -1)
    return values.to(dtype), token_ids


def full_epilogue(scores, ids, vocab_size: int, normalize: str, dtype: torch.dtype):
    """Normalised compact ``scores [N, CAP + 1]`` scattered into ``[N, vocab_size]``.

    Empty rows hold the fill value already (-inf logits, 0 probabilities) and point
    past the vocabulary; clamping them onto token V-1 under an amax reduction leaves
    that token's own value untouched. Out of place: it also serves as an Inductor
    decomposition, which runs under functionalization (``inductor_head.py``).
    """
    index = ids.clamp(max=vocab_size - 1).expand(scores.shape[0], -1)
    out = scores.new_full((scores.shape[0], vocab_size), fill_value(normalize))
    return out.scatter_reduce(1, index, scores, reduce="amax").to(dtype)


def sparse_topk_reference(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    normalize: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the active vocabulary, values optionally renormalised over it.

    Parameters
    ----------
    hidden : [N, H]
    rows, ids, count : the head's part of the state (``VocabState`` fields)
    bias : [V] or None
    k : int
    normalize : one of ``NORMALIZE_MODES``

    Returns
    -------
    values : [N, k] in ``hidden.dtype``; ``-inf`` (0 for softmax) past the active set
    token_ids : [N, k] int64; ``-1`` where fewer than k tokens are active
    """
    scores = normalize_scores(compact_logits(hidden, rows, ids, count, bias), normalize)
    return topk_epilogue(scores, ids, count, k, hidden.dtype)


def sparse_full_reference(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: torch.Tensor | None,
    vocab_size: int,
    normalize: str = "none",
) -> torch.Tensor:
    """Full-vocabulary output with the inactive entries filled.

    Returns
    -------
    [N, vocab_size] in ``hidden.dtype``: logits / log-probabilities with ``-inf``
    outside the active set, or probabilities with 0 there.
    """
    scores = normalize_scores(compact_logits(hidden, rows, ids, count, bias), normalize)
    return full_epilogue(scores, ids, vocab_size, normalize, hidden.dtype)
