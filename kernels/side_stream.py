"""The side stream of the asynchronous gather: one per vocabulary on a CUDA device.

The implementation behind ``microspec::observe_start`` / ``microspec::observe_wait``
(defined in ``ops.py``; the ordering argument is in ``async_gather.py``): ``start``
forks the current stream into the vocabulary's side stream, runs the observe kernels
there and records ``join``; ``wait`` makes the current stream wait on ``join``. Events
only, no host sync, nothing allocated for the state: the fork / join pattern that
CUDA-graph capture accepts.
"""
from __future__ import annotations

import weakref

import torch

from .state import VocabState

__all__ = ["GatherStream", "gather_stream"]

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
    the entry goes away with that tensor. Only ``state.count`` is read, so a state
    whose other fields are None names the same stream.
    """
    count = state.count
    key = (count.device.index, count.data_ptr())
    found = _STREAMS.get(key)
    if found is None:
        found = _STREAMS[key] = GatherStream(count.device)
        weakref.finalize(count, _STREAMS.pop, key, None)
    return found
