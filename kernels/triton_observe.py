"""Triton observe: dedup, append and gather new LM-head rows on the device, no host sync.

State layout and semantics: ``reference.observe_reference``. Two launches per call, both
on the current stream, neither reading anything back to the host:

``_claim_kernel``  grid (cdiv(n_tokens, BLOCK_T),). Each token lane reads ``member``;
    a present token refreshes ``last_seen`` of its row. An absent token tries to claim
    its membership entry with ``atomic_cas(member[t], -1, -2)``: exactly one lane per
    distinct id wins, so duplicates inside one program, across programs and ids already
    present are all handled by the table itself. Winners of a program reserve
    consecutive rows with one ``atomic_add`` on ``count`` (exclusive cumsum inside the
    program), copy only their weight rows into ``rows``, write ``ids`` / ``last_seen``
    and publish ``member[t] = row``. A winner whose row is ``>= CAP`` (vocabulary full)
    releases its claim (``member[t] = -1``) and lands in an overflow list at
    ``row - CAP``; ``count`` may then exceed CAP for the duration of the launch.
``_finish_kernel``  one program: ``step += 1``, ``count = min(count, CAP)`` and, for each
    of the ``count - CAP`` overflow tokens (0 in the steady state: the loop is empty),
    evicts the least recently observed row that is neither pinned nor touched by this
    call (``last_seen < step``, lowest row first on ties, as the reference's stable sort),
    copies the token's weight row there and updates ids / member / last_seen.

Differences from the reference (the invariants are the same, see ``tests/test_kernels``):

* Row order. Without eviction the SET of ids and the count equal the reference's, but
  the rows new ids land in depend on which lane wins each claim and on the order in
  which programs reach ``atomic_add(count)``; the reference fills rows in order of
  each new id's last occurrence. On a GPU the order can change from run to run.
* Eviction ties. Among rows of equal ``last_seen`` the lowest row goes first, as in the
  reference, but rows are in another order, so the evicted id can differ (the multiset
  of evicted ``last_seen`` values is the same).
* Overflow. When one call brings more new ids than there are free plus evictable rows,
  the reference keeps the ids that occur latest; here the ids that won the race for
  the free rows, then the first entries of the overflow list, are kept.
* Out-of-range ids (< 0 or >= V) are ignored on the device instead of raising (the op
  checks the range on CPU; on CUDA a check would need a host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .state import PINNED, VocabState

_PINNED_C = tl.constexpr(PINNED)


# n_tok changes every call: not specialised, so a 1-token call does not JIT a new variant
# in the middle of decoding.
@triton.jit(do_not_specialize=["n_tok", "H", "CAP", "V"])
def _claim_kernel(
    tok_ptr, n_tok, rows_ptr, ids_ptr, member_ptr, ls_ptr, count_ptr, step_ptr, w_ptr, over_ptr,
    H, CAP, V, stride_rr, stride_rk, stride_wv, stride_wk,
    PIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = tl.load(tok_ptr + offs, mask=offs < n_tok, other=-1).to(tl.int64)
    ok = (offs < n_tok) & (tok >= 0) & (tok < V)
    tok = tl.where(ok, tok, V)  # member[V] is the scratch entry (always -1)
    if PIN:
        stamp = tl.full([BLOCK_T], _PINNED_C, tl.int64)
    else:
        stamp = tl.full([BLOCK_T], 1, tl.int64) + tl.load(step_ptr)  # this call's step
    slot = tl.load(member_ptr + tok, mask=ok, other=-1)
    present = ok & (slot >= 0)
    seen = tl.load(ls_ptr + slot, mask=present, other=0)
    tl.store(ls_ptr + slot, stamp, mask=present & (seen != _PINNED_C))  # refresh; pinned stay pinned
    # Claim absent ids. atomic_cas has no mask: lanes that must not claim compare
    # against -3, a value no entry ever holds, so their CAS is a no-op.
    cmp = tl.where(ok & (slot < 0), -1, -3).to(tl.int64)
    old = tl.atomic_cas(member_ptr + tok, cmp, tl.full([BLOCK_T], -2, tl.int64))
    win = ok & (slot < 0) & (old == -1)
    rank = tl.cumsum(win.to(tl.int32), axis=0) - 1
    base = tl.atomic_add(count_ptr, tl.sum(win.to(tl.int64), axis=0))
    row = base + rank.to(tl.int64)
    fits = win & (row < CAP)
    over = win & (row >= CAP)
    row = tl.where(fits, row, CAP)
    tl.store(ids_ptr + row, tok, mask=fits)
    tl.store(ls_ptr + row, stamp, mask=fits)
    hh = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        m2 = fits[:, None] & (h[None, :] < H)
        w = tl.load(w_ptr + tok[:, None] * stride_wv + h[None, :] * stride_wk, mask=m2)
        tl.store(rows_ptr + row[:, None] * stride_rr + h[None, :] * stride_rk,
                 w.to(rows_ptr.dtype.element_ty), mask=m2)
    tl.store(over_ptr + (base + rank.to(tl.int64) - CAP), tok, mask=over)
    # Publish last: the row is complete before any later launch can read member.
    tl.store(member_ptr + tok, tl.where(fits, row, -1), mask=win)


@triton.jit(do_not_specialize=["H", "CAP"])
def _finish_kernel(
    over_ptr, rows_ptr, ids_ptr, member_ptr, ls_ptr, count_ptr, step_ptr, w_ptr,
    H, CAP, stride_rr, stride_rk, stride_wv, stride_wk,
    PIN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    step = tl.load(step_ptr) + 1
    tl.store(step_ptr, step)
    c = tl.load(count_ptr)
    tl.store(count_ptr, tl.minimum(c, CAP))
    n_over = tl.maximum(c - CAP, 0)
    if PIN:
        stamp = _PINNED_C
    else:
        stamp = step
    rr = tl.arange(0, BLOCK_C)
    hh = tl.arange(0, BLOCK_H)
    for j in range(n_over):  # empty unless this call overflowed the capacity
        t = tl.load(over_ptr + j)
        best_ls = tl.full([], _PINNED_C, tl.int64)
        best_r = tl.full([], CAP, tl.int64)
        for r0 in range(0, CAP, BLOCK_C):
            r = r0 + rr
            ls = tl.load(ls_ptr + r, mask=r < CAP, other=_PINNED_C)
            ls = tl.where(ls < step, ls, _PINNED_C)  # pinned / touched now: not evictable
            blk_ls = tl.min(ls, axis=0)
            blk_r = tl.min(tl.where(ls == blk_ls, r, CAP), axis=0).to(tl.int64)
            better = blk_ls < best_ls  # earlier blocks have lower rows: strict < keeps them
            best_r = tl.where(better, blk_r, best_r)
            best_ls = tl.where(better, blk_ls, best_ls)
        found = best_ls < step
        row = tl.where(found, best_r, CAP)
        old = tl.load(ids_ptr + row, mask=found, other=0)
        tl.store(member_ptr + old, -1, mask=found)
        tl.store(ids_ptr + row, t, mask=found)
        tl.store(member_ptr + t, row, mask=found)
        tl.store(ls_ptr + row, stamp, mask=found)
        found_h = (tl.zeros([BLOCK_H], tl.int64) + best_ls) < step  # vector mask
        for h0 in range(0, H, BLOCK_H):
            h = h0 + hh
            w = tl.load(w_ptr + t * stride_wv + h * stride_wk, mask=found_h & (h < H))
            tl.store(rows_ptr + row * stride_rr + h * stride_rk,
                     w.to(rows_ptr.dtype.element_ty), mask=found_h & (h < H))
        tl.debug_barrier()  # the next token's scan must see this row's new last_seen


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
    Same invariants as ``observe_reference``; same id set and count when nothing is
    evicted, rows possibly in another order (module docstring).
    """
    rows, ids, member, last_seen, count, step = state
    cap = rows.shape[0] - 1
    vocab = member.shape[0] - 1
    flat = tokens.reshape(-1)
    if flat.dtype == torch.bool or flat.is_floating_point():
        raise ValueError(f"token ids must be an integer tensor, got dtype {flat.dtype}")
    n = flat.numel()
    over = torch.empty(max(n, 1), dtype=torch.int64, device=rows.device)
    args = (rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1))
    if n:
        block_t = 64
        _claim_kernel[(triton.cdiv(n, block_t),)](
            flat, n, rows, ids, member, last_seen, count, step, weight, over,
            rows.shape[1], cap, vocab, *args, PIN=pin, BLOCK_T=block_t, BLOCK_H=128, num_warps=4)
    _finish_kernel[(1,)](
        over, rows, ids, member, last_seen, count, step, weight,
        rows.shape[1], cap, *args, PIN=pin, BLOCK_C=1024, BLOCK_H=1024, num_warps=4)


# ------------------------------------------------------------------ asynchronous gathering

_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def observe_async(state: VocabState, weight, tokens, pin=False, stream=None):
    """Run observe on a side stream so the row gather overlaps the draft's layers.

    Parameters
    ----------
    state, weight, tokens, pin
        As in :func:`observe_triton`.
    stream : torch.cuda.Stream or None
        The side stream; one cached stream per device when None.

    Returns
    -------
    torch.cuda.Event or None
        Recorded on the side stream after the update; the consumer must call
        ``torch.cuda.current_stream().wait_event(ev)`` before launching the sparse
        head. None on CPU, where observe ran synchronously.

    Notes
    -----
    Ordering argument:

    1. ``side.wait_stream(main)``: everything enqueued on the main stream so far
       happens before the update. That covers the producer of ``tokens`` (RAW) and
       the previous step's head kernels that read rows / ids / count (WAR: without
       it the gather could overwrite or evict a row that a queued head still reads).
    2. The update itself is two kernels on ``side`` (ordered among themselves).
    3. ``ev`` recorded on ``side`` after them; the head on the main stream waits on
       ``ev`` (RAW on the state). Work enqueued on main between this call and the
       wait (the draft's transformer layers) does not touch the state and overlaps.
    4. Lifetime: the caching allocator ties a block to the stream it was allocated
       on. ``tokens`` and ``weight`` were allocated on main but are read on ``side``,
       so ``record_stream(side)`` keeps their memory from being reused by main
       before the side kernels finish, even if the caller drops them right away.
       Temporaries made inside (the flattened tokens, the overflow list) are
       allocated while ``side`` is current, so they belong to it already.
    """
    device = state.rows.device
    if device.type != "cuda":
        from .dispatch import kernel

        kernel("observe", device)(state, weight, tokens, pin)
        return None
    main = torch.cuda.current_stream(device)
    side = stream if stream is not None else _side_stream(device)
    if tokens.device != device:
        tokens = tokens.to(device, non_blocking=True)  # copy is ordered on main
    side.wait_stream(main)
    with torch.cuda.stream(side):
        observe_triton(state, weight, tokens, pin)
        event = torch.cuda.Event()
        event.record(side)
    tokens.record_stream(side)
    weight.record_stream(side)
    return event
