"""The asynchronous gather inside a compiled graph: ``observe_start`` / ``observe_wait``.

Two ``torch.library`` ops that the backend inserts instead of ``microspec::observe``
(``passes/sparse_head.py``) when ``MicrospecConfig.async_gather`` is on::

    observe_start(state, weight, tokens)      where observe was: before the embedding
    ... embedding, decoder layers, final norm (free to overlap the gather) ...
    observe_wait(hidden, tokens, rows, ids, count)   immediately before the sparse head
    sparse_topk / sparse_full(hidden, rows, ids, count, ...)

On CUDA, ``observe_start`` launches the observe kernels (Triton, or the torch
reference under ``impl="torch"``) on the vocabulary's side stream and records its
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
import weakref
from typing import Optional

import torch

from .dispatch import kernel
from .ops import check_tokens, host_reads
from .state import VocabState

__all__ = ["GatherStream", "gather_stream", "capture_problem"]

_STREAMS: dict = {}  # (device index, count.data_ptr()) -> GatherStream


class GatherStream:
    """The side stream and the fork / join events of one vocabulary on one CUDA device.

    Parameters
    ----------
    device : torch.device
        A CUDA device.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.fork = torch.cuda.Event()
        self.join = torch.cuda.Event()

    def start(self, launch, *read) -> None:
        """Run ``launch()`` on the side stream after all work queued so far; record ``join``.

        ``read`` are tensors of the current stream that the side stream reads: outside
        a capture their memory is kept from reuse until the side kernels are done
        (``record_stream``); inside one the graph's pool owns them.
        """
        current = torch.cuda.current_stream(self.device)
        self.fork.record(current)
        self.stream.wait_event(self.fork)
        with torch.cuda.stream(self.stream):
            launch()
        self.join.record(self.stream)
        if not torch.cuda.is_current_stream_capturing():
            for tensor in read:
                tensor.record_stream(self.stream)

    def wait(self) -> None:
        """Make the current stream wait for the last gather started (a no-op before any)."""
        torch.cuda.current_stream(self.device).wait_event(self.join)


def gather_stream(state: VocabState) -> GatherStream:
    """The :class:`GatherStream` of a CUDA vocabulary state, created on first use.

    Keyed by the state's ``count`` tensor (allocated once per vocabulary, never moved);
    the entry goes away with that tensor.
    """
    count = state.count
    key = (count.device.index, count.data_ptr())
    found = _STREAMS.get(key)
    if found is None:
        found = _STREAMS[key] = GatherStream(count.device)
        weakref.finalize(count, _STREAMS.pop, key, None)
    return found


_STATE = ("rows", "ids", "member", "last_seen", "count", "step")


@torch.library.custom_op("microspec::observe_start", mutates_args=_STATE)
def observe_start_op(
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
    """Start adding unseen ``tokens`` to the state: on CUDA on the side stream, else now.

    Same arguments and final state as ``microspec::observe``; on CUDA the state may be
    read only after ``microspec::observe_wait``.
    """
    check_tokens(tokens, weight.shape[0], host_reads(rows.device, impl))
    if tokens.device != rows.device:
        tokens = tokens.to(rows.device, non_blocking=True)
    state = VocabState(rows, ids, member, last_seen, count, step)
    run = kernel("observe", rows.device, impl)
    if rows.device.type != "cuda":
        run(state, weight, tokens, pin)
        return
    gather_stream(state).start(lambda: run(state, weight, tokens, pin), tokens, weight)


@observe_start_op.register_fake
def _(rows, ids, member, last_seen, count, step, weight, tokens, pin=False, impl="auto"):
    return None


@torch.library.custom_op("microspec::observe_wait", mutates_args=("rows", "ids", "count"))
def observe_wait_op(
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
) -> None:
    """Join the gather: the current stream waits on the vocabulary's ``join`` event.

    ``hidden`` (the head's input) and ``tokens`` (the gathered ids) are only read, to
    order the wait after the layers and keep ``tokens`` alive; ``rows`` / ``ids`` /
    ``count`` are declared mutated (not written) so that the head is ordered after
    it (module docstring).  A no-op on CPU.
    """
    if count.device.type == "cuda":
        gather_stream(VocabState(rows, ids, None, None, count, None)).wait()


@observe_wait_op.register_fake
def _(hidden, tokens, rows, ids, count):
    return None


# ------------------------------------------------------------------ VocabState wrappers

def observe_start(state: VocabState, weight: torch.Tensor, tokens: torch.Tensor,
                  pin: bool = False, impl: str = "auto") -> None:
    """``microspec::observe_start`` on a state (arguments as ``ops.observe``)."""
    torch.ops.microspec.observe_start(*state, weight, tokens, pin, impl)


def observe_wait(hidden: torch.Tensor, tokens: torch.Tensor, state: VocabState) -> None:
    """``microspec::observe_wait`` on a state: ``hidden [..., H]`` is the head's input."""
    torch.ops.microspec.observe_wait(hidden, tokens, state.rows, state.ids, state.count)


@functools.cache
def capture_problem(device: torch.device, impl: str = "auto") -> Optional[str]:
    """Why the asynchronous gather cannot be captured in a CUDA graph on ``device``, or None.

    Captures ``observe_start -> observe_wait -> sparse_topk`` on a tiny state once
    (cached per device and ``impl``), replays it and checks the result against an
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
            observe_start(state, weight, tokens, impl=impl)
            observe_wait(x, tokens, state)
            return torch.ops.microspec.sparse_topk(x, state.rows, state.ids, state.count, None,
                                                   4, "none", impl)

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
