"""Triton observe: dedup, append and gather new LM-head rows on the device, no host sync.

State layout and semantics: ``reference.observe_reference``; the result is the
reference's, bit for bit (same ids in the same rows, same member / last_seen / count /
step; only the scratch row's contents may differ), on every run and device: nothing
depends on the order in which threads or programs run. Two launches per call, both on
the current stream, neither reading anything back to the host:

``_assign_kernel``  one program, the bookkeeping (a few vector ops per 1024 tokens):
    A. each token lane reads ``member``; a present id refreshes ``last_seen`` of its row
       (pinned rows stay pinned); an absent id records its LAST position ``p`` in its
       own membership entry with ``atomic_min(member[t], -2 - p)``;
    B. the lane holding an id's last position (``member[t] == -2 - p``) is that id's
       winner; winners are ranked in position order by a running cumsum over the token
       blocks (the reference's order of new ids);
    C. free rows ``CAP - count`` and evictable rows (live, ``last_seen < step``) give
       how many new ids fit; the latest ones are kept, as in the reference;
    D. kept ids of rank ``r`` below the free rows take row ``count + r``; ids that do
       not fit get ``member = -1`` back;
    E. each further kept id, in rank order, evicts the evictable row of least
       ``(last_seen, token id)`` (a scan over the rows per evicted id; zero in the
       steady state, when the vocabulary has room);
    and writes the (row, token) pairs to copy into a work buffer.
``_copy_kernel``  grid (cdiv(n_tokens, BLOCK_T),): copies the weight rows of the pairs.

Out-of-range ids (< 0 or >= V) are ignored on the device, as in the reference (the op
checks host tensors on the host: ``ops.check_tokens``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .state import PINNED, VocabState

_PINNED_C = tl.constexpr(PINNED)


# n_tok changes every call: not specialised, so a 1-token call does not JIT a new variant
# in the middle of decoding. Loads of values written earlier in the same launch bypass L1
# (.cg): other threads of the program wrote them, before a barrier.
@triton.jit(do_not_specialize=["n_tok", "CAP", "V"])
def _assign_kernel(
    tok_ptr, n_tok, ids_ptr, member_ptr, ls_ptr, count_ptr, step_ptr, work_ptr, CAP, V,
    PIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # work: [0, n) rank of each position among the new ids (-1: not a winner);
    # [n, 2n) row and [2n, 3n) token of the r-th kept id; [3n] number of kept ids
    step = tl.load(step_ptr) + 1
    tl.store(step_ptr, step)
    if PIN:
        stamp = tl.full([], _PINNED_C, tl.int64)
    else:
        stamp = step
    lanes = tl.arange(0, BLOCK_T)
    # A. refresh present ids, record each absent id's last position
    for t0 in range(0, n_tok, BLOCK_T):
        offs = t0 + lanes
        inb = offs < n_tok
        tok = tl.load(tok_ptr + offs, mask=inb, other=-1).to(tl.int64)
        ok = inb & (tok >= 0) & (tok < V)
        tok = tl.where(ok, tok, V)
        slot = tl.load(member_ptr + tok, mask=ok, other=-1, cache_modifier=".cg")
        present = ok & (slot >= 0)
        seen = tl.load(ls_ptr + slot, mask=present, other=0)
        tl.store(ls_ptr + slot, tl.zeros([BLOCK_T], tl.int64) + stamp,
                 mask=present & (seen != _PINNED_C))
        tl.atomic_min(member_ptr + tok, -2 - offs.to(tl.int64), mask=ok & (slot < 0))
    tl.debug_barrier()
    # B. winners (each new id's last position), ranked in position order
    n_new = tl.zeros([], tl.int64)
    for t0 in range(0, n_tok, BLOCK_T):
        offs = t0 + lanes
        inb = offs < n_tok
        tok = tl.load(tok_ptr + offs, mask=inb, other=-1).to(tl.int64)
        ok = inb & (tok >= 0) & (tok < V)
        tok = tl.where(ok, tok, V)
        m = tl.load(member_ptr + tok, mask=ok, other=0, cache_modifier=".cg")
        win = ok & (m == -2 - offs.to(tl.int64))
        rank = n_new + tl.cumsum(win.to(tl.int64), axis=0) - 1
        tl.store(work_ptr + offs, tl.where(win, rank, -1), mask=inb)
        n_new += tl.sum(win.to(tl.int64), axis=0)
    # C. how many fit: free rows, then live rows neither pinned nor touched now
    count = tl.load(count_ptr)
    free = CAP - count
    rr = tl.arange(0, BLOCK_C)
    evictable = tl.zeros([], tl.int64)
    for r0 in range(0, CAP, BLOCK_C):
        r = r0 + rr
        ls = tl.load(ls_ptr + r, mask=r < count, other=_PINNED_C, cache_modifier=".cg")
        evictable += tl.sum((ls < step).to(tl.int64), axis=0)
    start = tl.maximum(n_new - free - evictable, 0)
    n_keep = n_new - start
    n_fill = tl.minimum(n_keep, free)
    tl.debug_barrier()
    # D. kept ids into the free rows (in rank order); ids that do not fit are released
    for t0 in range(0, n_tok, BLOCK_T):
        offs = t0 + lanes
        inb = offs < n_tok
        rank = tl.load(work_ptr + offs, mask=inb, other=-1, cache_modifier=".cg")
        tok = tl.load(tok_ptr + offs, mask=inb, other=-1).to(tl.int64)
        win = rank >= 0
        tok = tl.where(win, tok, V)
        keep = win & (rank >= start)
        r = rank - start
        fill = keep & (r < free)
        row = tl.where(fill, count + r, CAP)
        tl.store(ids_ptr + row, tok, mask=fill)
        tl.store(ls_ptr + row, tl.zeros([BLOCK_T], tl.int64) + stamp, mask=fill)
        tl.store(member_ptr + tok, tl.where(fill, row, -1), mask=fill | (win & ~keep))
        tl.store(work_ptr + n_tok + r, row, mask=fill)
        tl.store(work_ptr + 2 * n_tok + r, tok, mask=keep)
    tl.store(count_ptr, count + n_fill)
    tl.store(work_ptr + 3 * n_tok, n_keep)
    tl.debug_barrier()
    # E. the other kept ids, in rank order, each evict the row of least (last_seen, id)
    for j in range(n_fill, n_keep):
        t = tl.load(work_ptr + 2 * n_tok + j, cache_modifier=".cg")
        best_ls = tl.full([], _PINNED_C, tl.int64)
        best_id = tl.full([], V + 1, tl.int64)
        best_r = tl.full([], CAP, tl.int64)
        for r0 in range(0, CAP, BLOCK_C):
            r = r0 + rr
            live = r < count
            ls = tl.load(ls_ptr + r, mask=live, other=_PINNED_C, cache_modifier=".cg")
            ls = tl.where(ls < step, ls, _PINNED_C)  # pinned / touched now: not evictable
            rid = tl.load(ids_ptr + r, mask=live, other=V, cache_modifier=".cg")
            blk_ls = tl.min(ls, axis=0)
            blk_id = tl.min(tl.where(ls == blk_ls, rid, V + 1), axis=0)
            blk_r = tl.min(tl.where((ls == blk_ls) & (rid == blk_id), r, CAP), axis=0).to(tl.int64)
            better = (blk_ls < best_ls) | ((blk_ls == best_ls) & (blk_id < best_id))
            best_r = tl.where(better, blk_r, best_r)
            best_id = tl.where(better, blk_id, best_id)
            best_ls = tl.where(better, blk_ls, best_ls)
        found = best_ls < step  # always: n_keep counted the evictable rows
        row = tl.where(found, best_r, CAP)
        old = tl.load(ids_ptr + row, mask=found, other=V, cache_modifier=".cg")
        tl.store(member_ptr + old, -1, mask=found)
        tl.store(ids_ptr + row, t, mask=found)
        tl.store(member_ptr + t, tl.where(found, row, -1))
        tl.store(ls_ptr + row, stamp, mask=found)
        tl.store(work_ptr + n_tok + j, row)
        tl.debug_barrier()  # the next id's scan must see this row's new last_seen


@triton.jit(do_not_specialize=["n_tok", "H", "CAP"])
def _copy_kernel(
    work_ptr, n_tok, rows_ptr, w_ptr, H, CAP, stride_rr, stride_rk, stride_wv, stride_wk,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_keep = tl.load(work_ptr + 3 * n_tok)
    ok = j < n_keep
    row = tl.load(work_ptr + n_tok + j, mask=ok, other=CAP)
    tok = tl.load(work_ptr + 2 * n_tok + j, mask=ok, other=0)
    ok = ok & (row < CAP)
    hh = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        m2 = ok[:, None] & (h[None, :] < H)
        w = tl.load(w_ptr + tok[:, None] * stride_wv + h[None, :] * stride_wk, mask=m2)
        tl.store(rows_ptr + row[:, None] * stride_rr + h[None, :] * stride_rk,
                 w.to(rows_ptr.dtype.element_ty), mask=m2)


def observe_triton(state: VocabState, weight, tokens, pin=False):
    """Add the unseen ``tokens`` to the vocabulary state in place, on the device.

    Parameters
    ----------
    state : VocabState
        ``rows [CAP + 1, H]``, ``ids / last_seen [CAP + 1]``, ``member [V + 1]``,
        ``count / step [1]`` (layout in ``state.py``); updated in place, never read on
        the host.
    weight : [V, H]
        Full LM-head weight; only the rows of new ids are read (cast to ``rows.dtype``).
    tokens : any shape, integer dtype, on the state's device
    pin : bool
        Mark the tokens as pinned (never evicted).

    Notes
    -----
    The same final state as ``observe_reference`` (module docstring).
    """
    rows, ids, member, last_seen, count, step = state
    cap = rows.shape[0] - 1
    vocab = member.shape[0] - 1
    flat = tokens.reshape(-1)
    if flat.dtype == torch.bool or flat.is_floating_point():
        raise ValueError(f"token ids must be an integer tensor, got dtype {flat.dtype}")
    n = flat.numel()
    work = torch.empty(3 * n + 1, dtype=torch.int64, device=rows.device)
    _assign_kernel[(1,)](flat, n, ids, member, last_seen, count, step, work, cap, vocab,
                         PIN=pin, BLOCK_T=1024, BLOCK_C=1024, num_warps=4)
    if n:
        block_t = 64
        _copy_kernel[(triton.cdiv(n, block_t),)](
            work, n, rows, weight, rows.shape[1], cap, rows.stride(0), rows.stride(1),
            weight.stride(0), weight.stride(1), BLOCK_T=block_t, BLOCK_H=128, num_warps=4)
