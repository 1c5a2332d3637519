"""The live active vocabulary of one LM head: fixed-capacity state tensors.

One ``ActiveVocab`` exists per head weight (a registry keyed by the weight
parameter), shared by every graph that Dynamo compiles for the model, so that
recompiles and graph breaks all see one vocabulary. All tensors are allocated
once, on the head weight's device (rows in its dtype), and only ever updated in
place: the compiled graphs take them as extra inputs and see new contents without
guards or recompiles.

Several sides configure one vocabulary: the draft's backend, the target's
observer and ``vocab_of``, each with its own ``capacity`` / ``pinned_ids``, in
whatever order they first run.  :meth:`ActiveVocab.merge` makes that order
irrelevant: settings that two sides give must agree, a setting one side leaves
out (None) never conflicts, and a given value wins over the default even when it
arrives after the vocabulary was created.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .config import DEFAULT_CAPACITY
from .kernels import ops
from .kernels.state import PINNED, VocabState

# The vocabulary of a head is stored on its weight tensor: it lives and dies with
# the model (a weight <-> vocabulary cycle is freed by the garbage collector).
_ATTR = "_microspec_vocab"


class ActiveVocab:
    """Fixed-capacity active vocabulary of an LM head.

    Parameters
    ----------
    weight : [V, H]
        The LM-head weight (a parameter; kept by reference, never copied whole).
    capacity : int
        Number of compact rows (CAP).
    pinned_ids : iterable of int
        Token ids that are always active and never evicted (EOS, BOS, ...).

    Attributes
    ----------
    rows, ids, member, last_seen, count, step
        The fields of :meth:`state`, a ``VocabState`` (layout in ``kernels/state.py``).
    capacity_given, pins_given : bool
        Whether some side asked for this capacity / these pins (False: the defaults,
        which a side that asks for a value replaces; see :meth:`merge`).
    """

    def __init__(self, weight: torch.Tensor, capacity: int = 4096, pinned_ids: Iterable[int] = ()):
        if weight.dim() != 2:
            raise ValueError(f"LM-head weight must be 2-D [V, H], got shape {list(weight.shape)}")
        vocab, hidden = weight.shape
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        capacity = min(capacity, vocab)
        self.weight = weight
        self.capacity = capacity
        self.vocab_size = vocab
        self.pinned_ids = tuple(int(i) for i in pinned_ids)
        if len(set(self.pinned_ids)) > capacity:
            raise ValueError(f"{len(set(self.pinned_ids))} pinned ids do not fit in capacity {capacity}")
        self._state = VocabState.empty(vocab, hidden, capacity, weight.dtype, weight.device)
        self.observed_calls = 0
        self.capacity_given = True
        self.pins_given = bool(self.pinned_ids)
        self.in_graph = False  # set when a compiled graph takes the state tensors as inputs
        self.reset()

    # -- state as graph inputs -------------------------------------------------
    def state(self) -> VocabState:
        """The state tensors (allocated once; the compiled graphs take them as inputs)."""
        return self._state

    def __getattr__(self, name: str):
        # rows, ids, member, last_seen, count, step: the state's fields
        if name in VocabState._fields and "_state" in self.__dict__:
            return getattr(self.__dict__["_state"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- settings from several sides ---------------------------------------------
    def merge(self, capacity: int | None = None, pinned_ids: Iterable[int] | None = None) -> None:
        """Take one side's settings into this vocabulary, whichever side came first.

        ``None`` (and, for ``pinned_ids``, an empty list: pins only add ids) means
        "left out": it never conflicts.  A given value must equal one another side
        gave; over a default it wins: new pins are added at once, a new capacity
        reallocates the state (keeping the active ids, the most recent first) as long
        as no compiled graph holds the state tensors yet.

        Raises
        ------
        ValueError
            Two sides gave different values (the message names the setting and both
            values), or a new capacity arrives after a compiled graph took the state.
        """
        pins = tuple(dict.fromkeys(int(i) for i in pinned_ids)) if pinned_ids else ()
        new_capacity = None
        if capacity is not None:
            if capacity < 1:
                raise ValueError(f"capacity must be >= 1, got {capacity}")
            wanted = min(int(capacity), self.vocab_size)
            if wanted != self.capacity:
                if self.capacity_given:
                    raise ValueError(
                        f"this LM-head weight already has a microspec vocabulary of capacity "
                        f"{self.capacity}; capacity={capacity} was asked for now: give the "
                        "backend, the observer and vocab_of the same capacity (or leave it "
                        "out on all but one)")
                if self.in_graph:
                    raise ValueError(
                        f"this LM-head weight's microspec vocabulary already serves a compiled "
                        f"graph with the default capacity {self.capacity}; capacity={capacity} "
                        "was asked for now, too late to reallocate it: give the same capacity "
                        "to the side that compiled first (backend(...), observer(...) or "
                        "vocab_of(...)), or leave it out")
                new_capacity = wanted
        if pins and self.pins_given and set(pins) != set(self.pinned_ids):
            raise ValueError(
                f"this LM-head weight already has a microspec vocabulary with pinned_ids="
                f"{list(self.pinned_ids)}; pinned_ids={list(pins)} was asked for now: give the "
                "backend, the observer and vocab_of the same pinned ids (or leave them out on "
                "all but one)")
        all_pins = tuple(dict.fromkeys(self.pinned_ids + pins))
        room = self.capacity if new_capacity is None else new_capacity
        if len(all_pins) > room:
            raise ValueError(f"{len(all_pins)} pinned ids do not fit in capacity {room}")
        if new_capacity is not None:
            self._reallocate(new_capacity, () if self.pins_given else pins)
        if capacity is not None:
            self.capacity_given = True
        if pins and not self.pins_given:
            self.pinned_ids = all_pins
            self.pins_given = True
            self.observe(torch.tensor(pins, dtype=torch.int64, device=self.rows.device), pin=True)

    @torch.no_grad()
    def _reallocate(self, capacity: int, new_pins: tuple = ()) -> None:
        """A new state of ``capacity`` rows: the pinned ids, room for ``new_pins``, then the
        most recently observed other ids that fit (they share one observation step)."""
        old = self._state
        n = old.size
        ids, seen = old.ids[:n], old.last_seen[:n]
        pinned = ids[seen == PINNED]
        room = capacity - len(set(pinned.tolist()) | set(new_pins))
        others = ids[seen != PINNED][torch.argsort(seen[seen != PINNED])]  # oldest first
        others = others[max(0, others.numel() - room):]
        self._state = VocabState.empty(self.vocab_size, old.rows.shape[1], capacity,
                                       old.rows.dtype, old.rows.device)
        self.capacity = capacity
        self._known_nonempty = False
        weight = self.weight.detach()
        if pinned.numel():
            ops.observe(self._state, weight, pinned, True)
        if others.numel():
            ops.observe(self._state, weight, others, False)

    # -- public API ------------------------------------------------------------
    @torch.no_grad()
    def observe(self, tokens, pin: bool = False) -> None:
        """Add the unseen ids in ``tokens`` (any shape, ints) to the vocabulary."""
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.device != self.rows.device:
            raise ValueError(
                f"token ids are on {tokens.device} but the vocabulary lives on {self.rows.device}"
            )
        ops.observe(self._state, self.weight.detach(), tokens, pin)
        self.observed_calls += 1
        if tokens.numel():
            self._known_nonempty = True

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the vocabulary between requests, keeping only the pinned ids."""
        self._state.clear_()
        self._known_nonempty = False
        if self.pinned_ids:
            self.observe(torch.tensor(self.pinned_ids, dtype=torch.int64, device=self.rows.device), pin=True)

    def is_empty(self) -> bool:
        """Whether no id is active.  Reads the count (a host sync) only until it has
        seen a non-empty vocabulary once after :meth:`reset`; later calls are free."""
        if self._known_nonempty:
            return False
        self._known_nonempty = int(self.count) > 0
        return not self._known_nonempty

    @property
    def size(self) -> int:
        """Number of active token ids (host sync)."""
        return int(self.count)

    def ids_list(self) -> list[int]:
        return self.ids[: self.size].tolist()

    def active_ids(self) -> torch.Tensor:
        """``[size]`` int64 tensor of the active token ids."""
        return self.ids[: self.size].clone()

    def contains(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean tensor, ``tokens``' shape: which ids are active."""
        tokens = torch.as_tensor(tokens, device=self.member.device).to(torch.int64)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids out of range for a vocabulary of {self.vocab_size}")
        return self.member[tokens] >= 0

    def stats(self) -> dict:
        pinned = int((self.last_seen[: self.size] == PINNED).sum())
        return {
            "size": self.size,
            "capacity": self.capacity,
            "vocab_size": self.vocab_size,
            "pinned": pinned,
            "observe_calls": self.observed_calls,
            "steps": int(self.step),
        }

    def __repr__(self) -> str:
        return f"ActiveVocab(size={self.size}, capacity={self.capacity}, vocab_size={self.vocab_size})"


def vocab_for_weight(weight: torch.Tensor, capacity: int | None = None,
                     pinned_ids: Iterable[int] | None = None) -> ActiveVocab:
    """The registered vocabulary of ``weight``, created on first use, with one side's settings.

    ``capacity`` / ``pinned_ids`` left out (None) take the defaults (``DEFAULT_CAPACITY``,
    no pins) or whatever another side gave; given ones are merged into an existing
    vocabulary by :meth:`ActiveVocab.merge`.

    Raises
    ------
    ValueError
        If another side gave another capacity (after clamping to V) or other pinned
        ids: e.g. ``observer(draft, capacity=512)`` and ``backend(capacity=4096)``
        would otherwise silently get 512 (or 4096, in the other order).
    """
    vocab = lookup(weight)
    if vocab is None:
        vocab = ActiveVocab(weight, DEFAULT_CAPACITY if capacity is None else capacity,
                            pinned_ids or ())
        vocab.capacity_given = capacity is not None
        setattr(weight, _ATTR, vocab)
        return vocab
    vocab.merge(capacity, pinned_ids)
    return vocab


def lookup(weight: torch.Tensor) -> "ActiveVocab | None":
    """The vocabulary registered on ``weight``, or None."""
    return getattr(weight, _ATTR, None)


def find_vocab(module: torch.nn.Module) -> "ActiveVocab | None":
    """The vocabulary registered on one of ``module``'s parameters, or None (never creates one)."""
    return next((v for v in map(lookup, module.parameters()) if v is not None), None)


def head_weight(module: torch.nn.Module, min_vocab_size: int = 1000) -> torch.Tensor:
    """A module's LM-head weight ``[V, H]``: HF's output embeddings, else the widest 2-D parameter.

    Raises
    ------
    LookupError
        If no 2-D parameter has ``min_vocab_size`` rows or more.
    """
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight
    candidates = [p for p in module.parameters() if p.dim() == 2 and p.shape[0] >= min_vocab_size]
    if not candidates:
        raise LookupError(f"no LM-head weight (a 2-D parameter with >= {min_vocab_size} rows) in "
                          f"this {type(module).__name__}, so it has no microspec vocabulary")
    return max(candidates, key=lambda p: p.shape[0])


def vocab_of(module: torch.nn.Module, *, capacity: int | None = None,
             pinned_ids: Iterable[int] | None = None, min_vocab_size: int = 1000) -> ActiveVocab:
    """The live vocabulary of a module compiled (or to be compiled) with the microspec backend.

    Works on the module compiled in place (``model.compile(backend="microspec")``)
    and on the ``OptimizedModule`` that ``torch.compile(model)`` returns, before or
    after its first call.  Before the first call it creates the vocabulary of the
    module's LM-head weight, so that ids can be observed first.  ``capacity`` /
    ``pinned_ids`` follow the backend's rule (:meth:`ActiveVocab.merge`): left out,
    they take the defaults or what the backend or observer gives; given, they must
    agree with what those give.

    Raises
    ------
    LookupError : the module has no LM-head-sized weight
    ValueError : ``capacity`` / ``pinned_ids`` differ from the existing vocabulary's
    """
    found = find_vocab(module)
    weight = found.weight if found is not None else head_weight(module, min_vocab_size)
    return vocab_for_weight(weight, capacity, pinned_ids)
