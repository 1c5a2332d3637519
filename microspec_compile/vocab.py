"""The active vocabulary of an LM head: an object you hold, in fixed-capacity state tensors.

>>> vocab = ActiveVocab(draft.lm_head.weight, capacity=2048, pinned_ids=[eos])
>>> fast = torch.compile(draft, backend=microspec_compile.backend(vocab=vocab))
>>> with using(other_vocab):   # one compiled head, another request's vocabulary
...     fast(ids)

A head can have any number of vocabularies (one per request): a compiled graph takes
the state tensors of the vocabulary in force at each call as extra inputs, so it
serves them all with no recompile.  All tensors are allocated once, on the head
weight's device (rows in its dtype), and only ever updated in place.

Which vocabulary a call of a compiled head reads, first match wins:

1. one bound for its head weight by :func:`using` around the call;
2. the one given to the backend (``backend(vocab=...)``);
3. the head's **default vocabulary** (:func:`default_vocab`), created by the first side
   that needs it (the backend from the graph's head, the observer, ``vocab_of``) with
   that side's ``capacity`` / ``pinned_ids``; a later side that gives other settings
   is an error that says to create one ``ActiveVocab`` and pass it to every side.  A
   graph compiled under ``using`` creates none until a call outside ``using`` needs it.

Nothing is stored on the weight: default vocabularies live in a registry keyed weakly
by the weight's identity, and hold the weight weakly, so they die with the model.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Iterable, Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .config import DEFAULT_CAPACITY
from .kernels import ops
from .kernels.state import PINNED, VocabState

__all__ = ["ActiveVocab", "using", "bound_vocab", "default_vocab", "find_vocab",
           "draft_head_weight", "vocab_of"]


class ActiveVocab:
    """Fixed-capacity active vocabulary of an LM head.

    Parameters
    ----------
    weight : [V, H]
        The LM-head weight (kept by reference, never copied whole).
    capacity : int
        Number of compact rows (CAP); clamped to V.
    pinned_ids : int or iterable of int
        Token ids that are always active and never evicted (EOS, BOS, ...).

    Attributes
    ----------
    rows, ids, member, last_seen, count, step
        The fields of :meth:`state`, a ``VocabState`` (layout in ``kernels/state.py``).
    """

    def __init__(self, weight: torch.Tensor, capacity: int = DEFAULT_CAPACITY,
                 pinned_ids: int | Iterable[int] = ()):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise ValueError(f"LM-head weight must be a 2-D tensor [V, H], got {shape}")
        if not weight.is_floating_point():
            raise ValueError(f"LM-head weight must be floating point, got dtype {weight.dtype}")
        vocab, hidden = weight.shape
        capacity = check_capacity(capacity, vocab)
        pins = normalize_pins(pinned_ids)
        if any(i < 0 or i >= vocab for i in pins):
            raise ValueError(f"pinned_ids {list(pins)} hold ids out of range for a vocabulary "
                             f"of {vocab}")
        if len(pins) > capacity:
            raise ValueError(f"{len(pins)} pinned ids do not fit in capacity {capacity}")
        self._weight_ref = weakref.ref(weight)
        self._weight = weight  # None for a default vocabulary (it must not keep its model)
        self.capacity = capacity
        self.vocab_size = vocab
        self.pinned_ids = pins
        self._state = VocabState.empty(vocab, hidden, capacity, weight.dtype, weight.device)
        self.observed_calls = 0
        self.reset()

    @property
    def weight(self) -> torch.Tensor:
        """The LM-head weight ``[V, H]`` this vocabulary gathers rows from."""
        weight = self._weight_ref()
        if weight is None:
            raise ValueError("the LM-head weight of this microspec vocabulary was freed: keep "
                             "the model (or the weight) alive while its vocabulary is used")
        return weight

    def belongs_to(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is this vocabulary's head weight (the same tensor)."""
        return self._weight_ref() is weight

    def check_serves(self, weight: torch.Tensor, capacity: int) -> None:
        """Raise a ValueError unless this vocabulary can stand in for one of ``weight``
        and ``capacity`` rows in a compiled graph (the same tensor; the same capacity)."""
        if not self.belongs_to(weight):
            raise ValueError(
                f"this microspec vocabulary belongs to another LM-head weight (its vocabulary "
                f"is {self.vocab_size} x {self._state.rows.shape[1]}; the head's weight is "
                f"{list(weight.shape)}): create ActiveVocab(head.weight, ...) for this head")
        if capacity != self.capacity:
            raise ValueError(
                f"this compiled head was built for vocabularies of capacity {capacity}, and a "
                f"vocabulary of capacity {self.capacity} was given: give every vocabulary "
                "of one compiled head the same capacity (or compile the head again)")

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


def check_capacity(capacity, vocab_size: int) -> int:
    """``capacity`` as an int clamped to ``vocab_size``; a ValueError if it is not >= 1."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    return min(capacity, vocab_size)


def normalize_pins(pinned_ids) -> tuple[int, ...]:
    """Pinned ids as a tuple of distinct ints, in order; a single int is one id."""
    if pinned_ids is None:
        return ()
    if isinstance(pinned_ids, int) or (isinstance(pinned_ids, torch.Tensor)
                                       and pinned_ids.dim() == 0):
        pinned_ids = [pinned_ids]
    return tuple(dict.fromkeys(int(i) for i in pinned_ids))


# -- the vocabulary in force for a call ------------------------------------------------
_BOUND: contextvars.ContextVar[tuple] = contextvars.ContextVar("microspec_bound", default=())


@contextlib.contextmanager
def using(*vocabs: ActiveVocab) -> Iterator[None]:
    """Inside the block, compiled heads (and the observer) of these vocabularies' weights
    read and feed these vocabularies instead of the ones they were compiled with.

    One vocabulary per head weight; nesting binds the innermost.  The binding is the
    calling thread's (``contextvars``): a new thread starts with none, so bind inside
    the thread that calls the model (e.g. a ``Thread(target=model.generate)`` streamer).
    """
    for vocab in vocabs:
        if not isinstance(vocab, ActiveVocab):
            raise TypeError(f"using() takes ActiveVocab objects, got {type(vocab).__name__}")
    token = _BOUND.set(vocabs + _BOUND.get())
    try:
        yield
    finally:
        _BOUND.reset(token)


def bound_vocab(weight: torch.Tensor) -> ActiveVocab | None:
    """The vocabulary :func:`using` binds for ``weight`` here, or None."""
    for vocab in _BOUND.get():
        if vocab.belongs_to(weight):
            return vocab
    return None


# -- default vocabularies ----------------------------------------------------------
# weight -> its default vocabulary, an entry dropped with the weight (the vocabulary
# holds its weight only weakly, so the model is freed as if the registry did not exist)
_DEFAULTS = WeakIdKeyDictionary()


def default_vocab(weight: torch.Tensor, capacity: int | None = None,
                  pinned_ids=None, *, create: bool = True) -> ActiveVocab | None:
    """The default vocabulary of ``weight``, created on first use with these settings.

    ``capacity`` / ``pinned_ids`` left out (None) take the defaults (``DEFAULT_CAPACITY``,
    no pins) or the existing vocabulary's.  ``create=False`` returns None where there is none.

    Raises
    ------
    ValueError
        The default vocabulary exists with another capacity (after clamping to V) or
        other pinned ids: two sides asked for different settings.
    """
    vocab = _DEFAULTS.get(weight)
    if vocab is None:
        if not create:
            return None
        vocab = ActiveVocab(weight, DEFAULT_CAPACITY if capacity is None else capacity,
                            normalize_pins(pinned_ids))
        vocab._weight = None
        _DEFAULTS[weight] = vocab
        return vocab
    pins = normalize_pins(pinned_ids)
    wanted = vocab.capacity if capacity is None else check_capacity(capacity, vocab.vocab_size)
    if wanted != vocab.capacity or (pins and set(pins) != set(vocab.pinned_ids)):
        raise ValueError(
            f"this LM head's default microspec vocabulary exists already with capacity="
            f"{vocab.capacity}, pinned_ids={list(vocab.pinned_ids)}; capacity={capacity}, "
            f"pinned_ids={list(pins)} were asked for now. Create one vocabulary and pass it to "
            "every side: vocab = microspec_compile.ActiveVocab(head.weight, capacity=..., "
            "pinned_ids=...); backend(vocab=vocab), observer(vocab), prepare(..., vocab=vocab)")
    return vocab


def find_vocab(module: torch.nn.Module) -> ActiveVocab | None:
    """The default vocabulary of one of ``module``'s parameters, or None (never creates one)."""
    for param in module.parameters():
        vocab = default_vocab(param, create=False)
        if vocab is not None:
            return vocab
    return None


def draft_head_weight(module: torch.nn.Module, min_vocab_size: int = 1000) -> torch.Tensor:
    """The LM-head weight ``[V, H]`` of a draft, found without guessing.

    In order: a parameter of ``module`` whose default vocabulary a compiled graph
    created (the backend found it as the graph's head); HF's ``get_output_embeddings()``;
    the one ``nn.Linear`` with ``min_vocab_size`` outputs or more.

    Raises
    ------
    LookupError
        No such weight, or several ``Linear`` layers that could be the head: the message
        says to create an ``ActiveVocab`` for the head and pass it.
    """
    found = find_vocab(module)
    if found is not None:
        return found.weight
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight
    linears = {id(m.weight): m.weight for m in module.modules()
               if isinstance(m, torch.nn.Linear) and m.out_features >= min_vocab_size}
    if len(linears) == 1:
        return next(iter(linears.values()))
    found = (f"{len(linears)} Linear layers with >= {min_vocab_size} outputs" if linears
             else f"no Linear layer with >= {min_vocab_size} outputs")
    raise LookupError(
        f"cannot tell which weight of this {type(module).__name__} is its LM head (no "
        f"get_output_embeddings(), {found}): create vocab = microspec_compile.ActiveVocab("
        "head.weight, ...) and pass it: backend(vocab=vocab), observer(vocab)")


def vocab_of(module: torch.nn.Module, *, capacity: int | None = None,
             pinned_ids=None, min_vocab_size: int = 1000) -> ActiveVocab:
    """The default vocabulary of a draft compiled (or to be compiled) with the microspec backend.

    Works on the module compiled in place (``model.compile(backend="microspec")``) and on
    the ``OptimizedModule`` that ``torch.compile(model)`` returns, before or after its
    first call.  Before the first call it creates the vocabulary, so that ids can be
    observed first; ``capacity`` / ``pinned_ids`` then apply (:func:`default_vocab`).  A
    vocabulary you created yourself (``ActiveVocab``) is yours to hold: this returns the
    head's default one.

    Raises
    ------
    LookupError : the head cannot be told (:func:`draft_head_weight`)
    ValueError : ``capacity`` / ``pinned_ids`` differ from the existing default vocabulary's
    """
    return default_vocab(draft_head_weight(module, min_vocab_size), capacity, pinned_ids)
