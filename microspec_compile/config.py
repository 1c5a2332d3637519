"""``MicrospecConfig``: the backend's settings, their one set of defaults and checks.

``microspec_compile.backend(**config)`` and ``microspec_compile.observer(draft,
**config)`` build one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .kernels.dispatch import check_path

# torch.compile's modes (``torch._inductor.list_mode_options``); the two that capture
# CUDA graphs are CUDA_GRAPH_MODES.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# The capacity of a vocabulary that no side asks a capacity for.
DEFAULT_CAPACITY = 4096


@dataclass(frozen=True)
class MicrospecConfig:
    """Settings of the backend.

    Parameters
    ----------
    vocab : the ``ActiveVocab`` the compiled head reads and its graph observes into
        (unless ``microspec_compile.using`` binds another around a call); None: the
        head's default vocabulary, created with ``capacity`` / ``pinned_ids`` by the first
        side that needs it (``vocab.default_vocab``)
    capacity : rows of the default vocabulary's compact head buffer (the most active
        tokens at once); None: ``DEFAULT_CAPACITY``, or what the side that created it gave
    pinned_ids : token ids always active and never evicted (EOS, BOS, ...) in the default
        vocabulary; None or empty: none asked for here.  A side that gives settings other
        than the existing default vocabulary's gets a ValueError
    min_vocab_size : a Linear with fewer output features is not treated as a head
    head : if set, only a head whose weight's graph name contains this string
    observe_inputs : observe the ids feeding the embedding on every call
    path : kernel path for the sparse head, ``"auto"``, ``"torch"``, ``"inductor"``
        or ``"triton"``; the ops take it as is (resolved per device in ``kernels/dispatch.py``)
    inductor : whether to compile the rewritten graph with Inductor (else run it eagerly)
    async_gather : with ``observe_inputs``, observe through ``microspec::observe_start``
        / ``observe_wait``: on CUDA the new rows are gathered on a side stream while
        the decoder layers run, and the head waits on an event just before it reads
        them (``kernels/async_gather.py``); on CPU it is the same synchronous observe.
        Off by default: a draft step adds a few rows at most, too little to overlap, and
        the extra op, events and stream switch cost more than they hide (measured on an
        H200: docs/RESULTS.md). False inserts the plain ``microspec::observe``
    mode : torch.compile's mode (``MODES``); ``torch.compile(..., mode=...)`` sets it.
        ``"reduce-overhead"`` / ``"max-autotune"`` capture CUDA graphs on CUDA
    """

    vocab: Optional[Any] = None
    capacity: Optional[int] = None
    pinned_ids: Optional[tuple] = None
    min_vocab_size: int = 1000
    head: Optional[str] = None
    observe_inputs: bool = True
    path: str = "auto"
    inductor: bool = True
    async_gather: bool = False
    mode: str = "default"

    def __post_init__(self):
        if not isinstance(self.async_gather, bool):
            raise ValueError(f"async_gather must be True or False, got {self.async_gather!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {' / '.join(MODES)}, got {self.mode!r}")
        if self.mode != "default" and not self.inductor:
            raise ValueError(f"mode={self.mode!r} needs inductor=True (it sets Inductor options)")
        if isinstance(self.pinned_ids, int):
            object.__setattr__(self, "pinned_ids", (self.pinned_ids,))
        if self.pinned_ids is not None:
            object.__setattr__(self, "pinned_ids", tuple(int(i) for i in self.pinned_ids))
        if self.capacity is not None and (not isinstance(self.capacity, int) or self.capacity < 1):
            raise ValueError(f"capacity must be an int >= 1, got {self.capacity!r}")
        if self.vocab is not None:
            from .vocab import ActiveVocab

            if not isinstance(self.vocab, ActiveVocab):
                raise TypeError(f"vocab must be a microspec_compile.ActiveVocab, got "
                                f"{type(self.vocab).__name__}")
            if self.capacity is not None or self.pinned_ids:
                raise ValueError("give capacity / pinned_ids to ActiveVocab(...) when you pass "
                                 "vocab=..., not to the backend as well")
        check_path(self.path)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the mode captures CUDA graphs (on CUDA devices)."""
        return self.mode in CUDA_GRAPH_MODES
