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
  only refreshes the last-seen stamps.
"""
from __future__ import annotations

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
    slots = state.member[flat]
    if flat.numel() == 0 or not bool((slots >= 0).all()):
        observe_reference(state, weight, tokens, pin)
        return
    step, last_seen = state.step, state.last_seen
    # Every token is active: nothing to gather or evict, only the LRU stamps move.
    step.add_(1)
    kept = last_seen[slots]
    stamp = torch.full_like(kept, PINNED) if pin else step.expand_as(kept)
    last_seen[slots] = torch.where(kept == PINNED, kept, stamp)
