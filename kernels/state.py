"""``VocabState``: the six tensors of one active vocabulary, written down once.

Every part that holds or passes a vocabulary state uses this type: ``ActiveVocab``
(``microspec_compile/vocab.py``), the op wrappers (``kernels/ops.py``), the kernels
(``reference.py``, ``cpu_head.py``, ``triton_observe.py``), the graph passes (whose
placeholders are a ``VocabState`` of ``fx.Node``), the tests and the benchmarks.

Layout, CAP = capacity, V = vocabulary size, H = hidden size:

========== ================ ===================================================
field      shape / dtype    meaning
========== ================ ===================================================
rows       [CAP + 1, H]     compact head weight; row CAP is a scratch row
ids        [CAP + 1] int64  token id of each row, ``V`` (out of range) if empty
member     [V + 1] int64    compact row of each token id, -1 if absent; entry V
                            is scratch
last_seen  [CAP + 1] int64  step at which a row was last observed; ``PINNED``
                            for pinned rows (never evicted)
count      [1] int64        number of occupied rows; rows ``[0, count)`` are live
step       [1] int64        observation counter, incremented by every observe
========== ================ ===================================================

The occupied rows always form the prefix ``[0, count)``: new tokens fill free rows
in order and eviction replaces a row in place. A state is allocated once and only
updated in place: compiled graphs take its tensors as inputs and see new contents
without guards or recompiles.

The registered ``torch.library`` ops need flat tensor arguments, so ``*state``
(a NamedTuple unpacks in field order) is how a state reaches them; everything
above the ops passes the ``VocabState`` itself.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

PINNED = torch.iinfo(torch.int64).max


class VocabState(NamedTuple):
    """The state tensors of one active vocabulary (layout in the module docstring).

    The fields may also hold other values of the same roles, e.g. the ``fx.Node``
    placeholders that carry a state into a graph (``passes/sparse_head.py``).
    """

    rows: Any
    ids: Any
    member: Any
    last_seen: Any
    count: Any
    step: Any

    @classmethod
    def empty(cls, vocab_size: int, hidden: int, capacity: int,
              dtype: torch.dtype = torch.float32, device="cpu") -> "VocabState":
        """A new, empty state.

        Parameters
        ----------
        vocab_size : int
            V, the rows of the full head weight.
        hidden : int
            H, the head's input features.
        capacity : int
            CAP, the most tokens active at once.
        dtype : torch.dtype
            Dtype of ``rows`` (the head weight's).
        device : torch.device or str

        Returns
        -------
        VocabState
            ``rows [CAP + 1, H]`` zeros, ``ids [CAP + 1]`` = V, ``member [V + 1]`` = -1,
            ``last_seen [CAP + 1]``, ``count [1]``, ``step [1]`` zeros.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        state = cls(
            rows=torch.zeros(capacity + 1, hidden, dtype=dtype, device=device),
            ids=torch.empty(capacity + 1, dtype=torch.int64, device=device),
            member=torch.empty(vocab_size + 1, dtype=torch.int64, device=device),
            last_seen=torch.empty(capacity + 1, dtype=torch.int64, device=device),
            count=torch.empty(1, dtype=torch.int64, device=device),
            step=torch.empty(1, dtype=torch.int64, device=device),
        )
        state.clear_()
        return state

    @property
    def capacity(self) -> int:
        """CAP (the scratch row not counted)."""
        return self.rows.shape[0] - 1

    @property
    def vocab_size(self) -> int:
        """V (the scratch membership entry not counted)."""
        return self.member.shape[0] - 1

    @property
    def size(self) -> int:
        """Number of active token ids (a host read of ``count``)."""
        return int(self.count)

    def clear_(self) -> None:
        """Empty the state in place (no pinned ids kept; ``rows`` are left as they are)."""
        self.ids.fill_(self.vocab_size)
        self.member.fill_(-1)
        self.last_seen.zero_()
        self.count.zero_()
        self.step.zero_()

    def clone(self) -> "VocabState":
        """A copy with new storage."""
        return VocabState(*(t.clone() for t in self))

    def to(self, device) -> "VocabState":
        """The state on ``device`` (a copy unless it is there already)."""
        return VocabState(*(t.to(device) for t in self))

    def live_ids(self):
        """``[size]`` int64 view of the active token ids."""
        return self.ids[: self.size]
