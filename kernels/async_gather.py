"""The asynchronous gather inside a compiled graph: ``observe_start`` / ``observe_wait``.

Two ``torch.library`` ops (defined in ``ops.py``, their side stream in
``side_stream.py``; this module holds the ordering argument and the capture probe)
that the backend inserts instead of ``microspec::observe``
(``passes/sparse_head.py``) when ``MicrospecConfig.async_gather`` is on::

    observe_start(state, weight, tokens)      where observe was: before the embedding
    ... embedding, decoder layers, final norm (free to overlap the gather) ...
    observe_wait(hidden, tokens, rows, ids, count)   immediately before the sparse head
    sparse_topk / sparse_full(hidden, rows, ids, count, ...)

On CUDA, ``observe_start`` launches the observe kernels (Triton, or the torch
reference under ``path="torch"``) on the vocabulary's side stream and records its
``join`` event; ``observe_wait`` makes the current stream wait on that event.  On CPU
``observe_start`` is today's synchronous observe (same kernel, same result) and
``observe_wait`` does nothing.

Ordering, and why Inductor cannot break it
------------------------------------------
Inductor orders nodes by data dependencies only, so every required order is a
dependency in the schema:

* start -> wait -> head.  ``observe_start`` mutates all six state tensors;
  ``observe_wait`` is declared to mutate ``rows``, ``ids`` and ``count`` (it writes
  nothing: the declaration is the dependency), so it reads start's versions and every
  reader of the head's three tensors (the opaque head op, or each kernel of the
  decomposed ``"inductor"`` path: the ``mm`` reads ``rows`` alone) reads the wait's
  versions and is scheduled after it.  Only graph inputs are mutated and nothing
  reads their old versions later, so the reinplacing pass keeps both calls in place
  (no copy of the buffer; ``tests/test_async_gather.py`` checks the generated code).
* layers -> wait.  ``observe_wait`` reads ``hidden``, the head's input, so it cannot
  be hoisted above the decoder layers (that would be correct, but serial).
* ``tokens`` stay alive until the wait.  Inductor plans buffer reuse for one stream:
  if ``tokens`` were an intermediate whose last use is the embedding, its memory
  could be handed to a layer's output while the side stream still reads it.  The
  wait reads ``tokens``, which extends its lifetime past the gather.
* The previous step's head before this step's gather (write-after-read on ``rows``).
  ``observe_start`` records ``fork`` on the current stream and the side stream waits
  on it: everything queued before it, the previous head included, happens first.

No host sync anywhere (events only), and nothing is allocated for the state: the
pattern is the fork / join by events that CUDA-graph capture accepts, so the whole
draft step can be captured (``mode="reduce-overhead"``).  :func:`capture_problem`
tries it once per device on a tiny state; the backend falls back to the synchronous
observe with one warning when it fails.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import ops
from .state import VocabState

__all__ = ["capture_problem"]


@functools.cache
def capture_problem(device: torch.device, path: str = "auto") -> Optional[str]:
    """Why the asynchronous gather cannot be captured in a CUDA graph on ``device``, or None.

    Captures ``observe_start -> observe_wait -> sparse_topk`` on a tiny state once
    (cached per device and ``path``), replays it and checks the result against an
    eager run. Host syncs here are fine: the backend calls it while compiling.

    Returns
    -------
    str or None
        ``"<exception type>: <message>"`` or a mismatch description; None if it works
        (always None on a non-CUDA device, which has no CUDA graphs).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        vocab, hidden, cap = 64, 16, 32
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(vocab, hidden, generator=gen, device="cpu").to(device)
        x = torch.randn(2, hidden, generator=gen, device="cpu").to(device)
        tokens = torch.arange(0, 20, device=device)
        eager = VocabState.empty(vocab, hidden, cap, device=device)
        captured = eager.clone()

        def step(state):
            ops.observe_start(state, weight, tokens, path=path)
            ops.observe_wait(x, tokens, state)
            return ops.sparse_topk(x, state, None, 4, "none", path)

        expected = step(eager)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up off the default stream, as capture wants
            step(captured.clone())
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(captured)
        graph.replay()
        torch.cuda.synchronize(device)
        if not (torch.equal(out[1], expected[1]) and int(captured.count) == int(eager.count)):
            return "the replayed graph gave another result than the eager gather"
    except Exception as e:  # any failure means: do not capture this path
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
