"""The sparse head and the observe on CPU, where a host read costs nothing.

There is no device to stall on CPU, so unlike the capturable references these
paths branch on tensor values:

* the head slices the compact buffer to the ``count`` live rows and runs the
  matmul in the weight's own dtype (oneDNN accumulates bf16 / fp16 in fp32),
  then normalises the ``[N, count]`` scores in fp32;
* the observe first checks whether every token is already active.  In a
  draft's decode loop that is the common case (the draft's input is a token it
  drafted, i.e. an active one), and the sync-free reference spends about 1.7 ms
  on ~50 small ops to find out (measured, SmolLM2 draft step); the fast path
  only refreshes the last-seen stamps.  New tokens that fit in the free rows (the
  rest of a request, with a few hundred active ids in 4096 rows) are written to
  the next rows directly, without the reference's sorts over the capacity (20 ids,
  5 new, into a 4096-row vocabulary of 200 ids: 0.059 vs 0.193 ms, alternated calls
  on the project's Xeon); only an eviction takes the reference.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .reference import fill_value, normalize_scores, observe_reference
from .state import PINNED, VocabState


def _live_scores(hidden, rows, ids, count, bias):
    n = int(count)
    live_ids = ids[:n]
    scores = F.linear(hidden, rows[:n]).float()
    if bias is not None:
        scores += bias[live_ids].float()
    return scores, live_ids


def sparse_topk_cpu(hidden, rows, ids, count, bias, k, normalize):
    """Same contract as ``reference.sparse_topk_reference``; ``hidden`` is ``[N, H]``."""
    scores, live_ids = _live_scores(hidden, rows, ids, count, bias)
    scores = normalize_scores(scores, normalize)
    kk = min(k, scores.shape[1])
    values, index = torch.topk(scores, kk, dim=-1)
    token_ids = live_ids[index]
    if kk < k:  # fewer live rows than k: pad like the reference
        values = F.pad(values, (0, k - kk), value=fill_value(normalize))
        token_ids = F.pad(token_ids, (0, k - kk), value=-1)
    return values.to(hidden.dtype), token_ids


def sparse_full_cpu(hidden, rows, ids, count, bias, vocab_size, normalize):
    """Same contract as ``reference.sparse_full_reference``."""
    scores, live_ids = _live_scores(hidden, rows, ids, count, bias)
    scores = normalize_scores(scores, normalize).to(hidden.dtype)
    out = hidden.new_full((hidden.shape[0], vocab_size), fill_value(normalize))
    out.index_copy_(1, live_ids, scores)
    return out


def observe_cpu(state: VocabState, weight, tokens, pin=False):
    """Same contract and final state as ``reference.observe_reference``."""
    flat = tokens.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        observe_reference(state, weight, tokens, pin)
        return
    if flat.numel() <= _FEW and _refresh_if_present(state, flat.numpy(), pin):
        return
    slots = state.member[flat]
    if bool((slots >= 0).all()):
        _refresh(state, slots, pin)
        return
    # Each token's last occurrence, in order of occurrence (the reference's order for new
    # tokens); new ones go to the free rows in index order, as in the reference, so long as
    # they fit (else eviction: the reference)
    last = dict(zip(flat.tolist(), zip(range(flat.numel()), slots.tolist())))
    new = [t for t, _ in sorted(((t, p) for t, (p, s) in last.items() if s < 0),
                                key=lambda tp: tp[1])]
    start, capacity = int(state.count), state.rows.shape[0] - 1
    if start + len(new) > capacity:
        observe_reference(state, weight, tokens, pin)
        return
    present = [s for s, _ in ((s, p) for _, (p, s) in last.items()) if s >= 0]
    host = flat.device  # the CPU kernels' tensors are host tensors by design
    stamp = _refresh(state, torch.tensor(present, dtype=torch.int64, device=host), pin)
    new_ids = torch.tensor(new, dtype=torch.int64, device=host)
    dest = torch.arange(start, start + len(new), device=host)
    state.ids[dest] = new_ids
    state.member[new_ids] = dest
    state.rows[dest] = weight[new_ids].to(state.rows.dtype)
    state.last_seen[dest] = stamp
    state.count.add_(len(new))


# Up to this many ids, the all-present check and the refresh run on numpy views of the
# state (zero-copy: the CPU kernels' tensors are host tensors): a decode step's one or
# few ids cost about 5 us there instead of ~10 small torch ops (~30 us of dispatch).
_FEW = 64


def _refresh_if_present(state: VocabState, tokens: np.ndarray, pin: bool) -> bool:
    """``_refresh`` of the rows of ``tokens`` [n] int64 if every one is active; returns
    whether they were (else nothing is written)."""
    slots = state.member.numpy()[tokens]
    if (slots < 0).any():
        return False
    step = state.step.numpy()
    step[0] += 1
    last_seen = state.last_seen.numpy()
    kept = last_seen[slots]
    last_seen[slots] = np.where(kept == PINNED, kept, PINNED if pin else step[0])
    return True


def _refresh(state: VocabState, slots: torch.Tensor, pin: bool) -> int:
    """Step the clock and stamp the rows ``slots`` (pinned rows stay pinned); returns the
    stamp of this call."""
    state.step.add_(1)
    stamp = PINNED if pin else int(state.step)
    if slots.numel():
        kept = state.last_seen[slots]
        state.last_seen[slots] = torch.where(kept == PINNED, kept, torch.full_like(kept, stamp))
    return stamp
