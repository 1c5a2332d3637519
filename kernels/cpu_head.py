"""The sparse head on CPU: score only the ``count`` live rows.

On CPU a host read of ``count`` costs nothing (there is no device to stall), so
unlike the capturable reference this path slices the compact buffer to the live
rows and runs the matmul in the weight's own dtype (oneDNN accumulates bf16 /
fp16 in fp32), then normalises the ``[N, count]`` scores in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _normalize


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
    scores = _normalize(scores, normalize)
    kk = min(k, scores.shape[1])
    values, index = torch.topk(scores, kk, dim=-1)
    token_ids = live_ids[index]
    if kk < k:  # fewer live rows than k: pad like the reference
        pad_value = 0.0 if normalize == "softmax" else float("-inf")
        values = F.pad(values, (0, k - kk), value=pad_value)
        token_ids = F.pad(token_ids, (0, k - kk), value=-1)
    return values.to(hidden.dtype), token_ids


def sparse_full_cpu(hidden, rows, ids, count, bias, vocab_size, normalize):
    """Same contract as ``reference.sparse_full_reference``."""
    scores, live_ids = _live_scores(hidden, rows, ids, count, bias)
    scores = _normalize(scores, normalize).to(hidden.dtype)
    fill = 0.0 if normalize == "softmax" else float("-inf")
    out = hidden.new_full((hidden.shape[0], vocab_size), fill)
    out.index_copy_(1, live_ids, scores)
    return out
