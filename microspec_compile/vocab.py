"""The live active vocabulary of one LM head: fixed-capacity state tensors.

One ``ActiveVocab`` exists per head weight (a registry keyed by the weight
parameter), shared by every graph that Dynamo compiles for the model, so that
recompiles and graph breaks all see one vocabulary. All tensors are allocated
once, on the head weight's device (rows in its dtype), and only ever updated in
place: the compiled graphs take them as extra inputs and see new contents without
guards or recompiles.
"""
from __future__ import annotations

from typing import Iterable

import torch

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


def vocab_for_weight(weight: torch.Tensor, capacity: int, pinned_ids: Iterable[int]) -> ActiveVocab:
    """The registered vocabulary of ``weight``, created on first use.

    Raises
    ------
    ValueError
        If ``weight`` already has a vocabulary of another capacity (after clamping to
        V) or other pinned ids: e.g. ``observer(draft, capacity=512)`` followed by
        ``backend(capacity=4096)`` would otherwise silently get 512.
    """
    vocab = lookup(weight)
    if vocab is None:
        vocab = ActiveVocab(weight, capacity, pinned_ids)
        setattr(weight, _ATTR, vocab)
        return vocab
    wanted = min(capacity, vocab.vocab_size)
    if wanted != vocab.capacity:
        raise ValueError(
            f"this LM-head weight already has a microspec vocabulary of capacity "
            f"{vocab.capacity}; capacity={capacity} was asked for now: give the backend and "
            "the observer the same capacity")
    pinned = tuple(int(i) for i in pinned_ids)
    if sorted(set(pinned)) != sorted(set(vocab.pinned_ids)):
        raise ValueError(
            f"this LM-head weight already has a microspec vocabulary with pinned_ids="
            f"{list(vocab.pinned_ids)}; pinned_ids={list(pinned)} was asked for now: give the "
            "backend and the observer the same pinned ids")
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
    module's LM-head weight, so that ids can be observed first: give it the
    backend's ``capacity`` and ``pinned_ids`` (defaults: the backend's defaults; a
    mismatch raises when the backend compiles).

    Raises
    ------
    LookupError : the module has no LM-head-sized weight
    ValueError : ``capacity`` / ``pinned_ids`` differ from the existing vocabulary's
    """
    found = find_vocab(module)
    if found is not None and capacity is None and pinned_ids is None:
        return found
    from .config import MicrospecConfig

    base = found if found is not None else MicrospecConfig()
    weight = found.weight if found is not None else head_weight(module, min_vocab_size)
    return vocab_for_weight(weight, base.capacity if capacity is None else capacity,
                            base.pinned_ids if pinned_ids is None else pinned_ids)
