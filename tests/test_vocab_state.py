"""Invariants of the active-vocabulary state under random observation sequences."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microspec_compile.kernels.reference import PINNED
from microspec_compile.vocab import ActiveVocab

from strategies import check_invariants


class LruModel:
    """A plain-Python restatement of the observe semantics, slot by slot.

    Free slots fill in index order; when full, the unpinned slots not touched by
    this call are evicted least-recently-seen first (ties: lower token id first, so
    the evicted ids never depend on the slots the ids happen to sit in). A
    call bringing more new ids than that keeps the ids occurring latest.
    """

    def __init__(self, capacity: int, pinned: list[int]):
        self.slots: list[list] = []  # [token, last_seen]
        self.capacity = capacity
        self.step = 0
        if pinned:
            self.observe(pinned, pin=True)

    def observe(self, tokens: list[int], pin: bool = False) -> None:
        self.step += 1
        stamp = PINNED if pin else self.step
        last_pos = {t: i for i, t in enumerate(tokens)}
        owned = {slot[0]: slot for slot in self.slots}
        for t in last_pos:
            if t in owned and owned[t][1] != PINNED:
                owned[t][1] = stamp
        new = sorted((p, t) for t, p in last_pos.items() if t not in owned)
        free = list(range(len(self.slots), self.capacity))
        old = sorted((s[1], s[0], i) for i, s in enumerate(self.slots) if s[1] < self.step)
        targets = free + [i for *_, i in old]
        new = new[max(0, len(new) - len(targets)):]
        for (_, token), slot in zip(new, targets):
            if slot < len(self.slots):
                self.slots[slot] = [token, stamp]
            else:
                self.slots.append([token, stamp])


observations = st.lists(
    st.lists(st.integers(0, 39), min_size=0, max_size=12), min_size=1, max_size=25
)


@settings(max_examples=150, deadline=None)
@given(
    calls=observations,
    capacity=st.integers(3, 16),
    pinned=st.lists(st.integers(0, 39), max_size=2, unique=True),
)
def test_state_matches_lru_model(calls, capacity, pinned):
    weight = torch.randn(40, 6)
    vocab = ActiveVocab(weight, capacity=capacity, pinned_ids=pinned)
    model = LruModel(capacity, pinned)
    for tokens in calls:
        vocab.observe(torch.tensor(tokens, dtype=torch.int64))
        model.observe(tokens)
        check_invariants(vocab, pinned=vocab.pinned_ids)
        assert vocab.ids_list() == [s[0] for s in model.slots]
        assert vocab.last_seen[: vocab.size].tolist() == [s[1] for s in model.slots]


def test_eviction_is_least_recently_observed_first():
    vocab = ActiveVocab(torch.randn(20, 4), capacity=4, pinned_ids=[0])
    vocab.observe(torch.tensor([1, 2, 3]))
    vocab.observe(torch.tensor([1]))  # refresh 1: 2 is now the oldest
    vocab.observe(torch.tensor([9]))
    assert sorted(vocab.ids_list()) == [0, 1, 3, 9]
    vocab.observe(torch.tensor([10, 11]))  # evicts 3 then 1; pinned 0 stays
    assert sorted(vocab.ids_list()) == [0, 9, 10, 11]


def test_observe_accepts_any_shape_and_duplicates():
    vocab = ActiveVocab(torch.randn(50, 4), capacity=8)
    vocab.observe(torch.tensor([[3, 3, 4], [4, 5, 3]], dtype=torch.int32))
    assert sorted(vocab.ids_list()) == [3, 4, 5]
    vocab.observe([5, 6])
    assert sorted(vocab.ids_list()) == [3, 4, 5, 6]
    check_invariants(vocab, pinned=vocab.pinned_ids)


def test_reset_keeps_only_pinned_and_never_reallocates():
    vocab = ActiveVocab(torch.randn(50, 4), capacity=8, pinned_ids=[7, 2])
    pointers = [t.data_ptr() for t in vocab.state()]
    vocab.observe(torch.arange(20, 40))
    vocab.reset()
    assert sorted(vocab.ids_list()) == [2, 7]
    assert [t.data_ptr() for t in vocab.state()] == pointers
    check_invariants(vocab, pinned=vocab.pinned_ids)


def test_oversized_call_keeps_latest_ids():
    vocab = ActiveVocab(torch.randn(100, 4), capacity=5, pinned_ids=[99])
    vocab.observe(torch.arange(10))
    assert sorted(vocab.ids_list()) == [6, 7, 8, 9, 99]


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.tensor([1.0, 2.0]), "integer"),  # float ids
        (torch.tensor([True]), "integer"),  # bool mask passed by mistake
        (torch.tensor([0, 50]), "out of range"),  # one past the vocabulary
        (torch.tensor([-1]), "out of range"),  # negative (padding) id
        (torch.zeros(2, dtype=torch.int64, device="meta"), "vocabulary lives on"),  # device
    ],
)
def test_bad_ids_raise_clear_errors(tokens, message):
    vocab = ActiveVocab(torch.randn(50, 4), capacity=8)
    with pytest.raises(ValueError, match=message):
        vocab.observe(tokens)
    assert vocab.size == 0  # nothing half-applied


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="2-D"):
        ActiveVocab(torch.randn(5), capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        ActiveVocab(torch.randn(5, 2), capacity=0)
    with pytest.raises(ValueError, match="pinned"):
        ActiveVocab(torch.randn(50, 2), capacity=2, pinned_ids=[1, 2, 3])


def test_contains_and_stats():
    vocab = ActiveVocab(torch.randn(30, 4), capacity=8, pinned_ids=[1])
    vocab.observe(torch.tensor([4, 5]))
    assert vocab.contains(torch.tensor([1, 4, 6])).tolist() == [True, True, False]
    stats = vocab.stats()
    assert stats["size"] == 3 and stats["pinned"] == 1 and stats["capacity"] == 8
    with pytest.raises(ValueError, match="out of range"):
        vocab.contains(torch.tensor([30]))
