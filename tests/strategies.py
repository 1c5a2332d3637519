"""Hypothesis strategies and fp64 checkers shared by the kernel tests.

A drawn :class:`HeadState` (a ``VocabState`` plus the head it was gathered from) is
always built through ``observe_reference`` (so it
satisfies the reference's invariants by construction) from token batches that contain
duplicates, ids already present and, when pinned ids are drawn, a pinned call first.
Tensors come from a seeded ``torch.Generator``: an example is reproducible from the
values hypothesis prints.

Checkers: tolerances (:func:`tol`) are taken against an fp64 evaluation of the same (already
rounded) inputs, and the references must meet them too (``test_reference_meets_tolerance``):
* fp32 accumulation over H <= 130 products of size <~ 10: |err| <= H * 2^-24 * sum|x_i w_i|
  ~ 1e-4 absolute at worst (exp / log in fp32 add ~1e-6 relative on O(1) values);
* one final rounding to the output dtype: <= u |x| with u = 2^-24 / 2^-11 / 2^-8 for
  fp32 / fp16 / bf16; rtol = 1.5 u leaves room for the fp32 error above under rounding.
Top-k ids are checked without depending on tie order: each returned id is active and
distinct, its fp64 score equals the returned value, and the returned values equal the
fp64 top-k values, all within ``tol``.

Shapes are tiny on purpose: under ``TRITON_INTERPRET=1`` every Triton program
instance costs ~0.7 ms and every tl op a few tens of microseconds.
"""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from microspec_compile.kernels.reference import observe_reference
from microspec_compile.kernels.state import VocabState

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORMALIZE = ("none", "softmax", "log_softmax")
COUNT_KINDS = ("empty", "one", "partial", "full")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def tol(dtype):
    """``assert_close`` tolerances against fp64 (module docstring)."""
    return dict(rtol=1.5 * UNIT_ROUNDOFF[dtype], atol=1e-4)


@dataclasses.dataclass
class HeadState:
    """A vocabulary state plus the full head it was gathered from.

    Attributes
    ----------
    weight : [V, H] full head weight (``dtype``)
    bias : [V] fp32 or None
    vocab_state : VocabState; its fields (``rows``, ``ids``, ...) read as attributes here
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    vocab_state: VocabState

    def __getattr__(self, name):
        if name in VocabState._fields:
            return getattr(self.vocab_state, name)
        raise AttributeError(name)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def cap(self) -> int:
        return self.vocab_state.capacity

    @property
    def n(self) -> int:
        return self.vocab_state.size

    def clone(self) -> "HeadState":
        return dataclasses.replace(self, vocab_state=self.vocab_state.clone())

    def to(self, device) -> "HeadState":
        bias = None if self.bias is None else self.bias.to(device)
        return HeadState(self.weight.to(device), bias, self.vocab_state.to(device))


def empty_state(weight: torch.Tensor, cap: int, bias: torch.Tensor | None = None) -> HeadState:
    """An empty state of capacity ``cap`` for ``weight`` [V, H] (as ``ActiveVocab.reset``)."""
    vocab, hidden = weight.shape
    return HeadState(weight, bias, VocabState.empty(vocab, hidden, cap, weight.dtype))


@st.composite
def token_batch(draw, vocab: int, present: torch.Tensor | None = None, max_len: int = 12):
    """Token ids [n] (n may be 0): fresh ids, repeats within the batch, present ids.

    Parameters
    ----------
    vocab : int
    present : [m] int64 or None
        Ids already in the vocabulary; some are mixed in when given.
    """
    fresh = draw(st.lists(st.integers(0, vocab - 1), max_size=max_len))
    if fresh and draw(st.booleans()):
        fresh += draw(st.lists(st.sampled_from(fresh), max_size=4))  # duplicates
    if present is not None and present.numel() and draw(st.booleans()):
        fresh += draw(st.lists(st.sampled_from(present.tolist()), max_size=4))
    order = draw(st.permutations(range(len(fresh)))) if fresh else []
    dtype = draw(st.sampled_from((torch.int64, torch.int32)))
    return torch.tensor([fresh[i] for i in order], dtype=dtype)


@st.composite
def vocab_states(draw, dtypes=DTYPES, count_kinds=COUNT_KINDS, max_vocab: int = 120,
                 max_hidden: int = 40, max_cap: int = 70, with_bias=None):
    """A :class:`HeadState` built through ``observe_reference``.

    Parameters
    ----------
    dtypes : sequence of torch.dtype
        Head dtypes to draw from.
    count_kinds : sequence of COUNT_KINDS entries
        Drawn from: ``"empty"`` (count 0), ``"one"`` (a single token, observed twice),
        ``"partial"``, ``"full"`` (count == CAP, often after evictions).
    max_vocab, max_hidden, max_cap : int
        Upper bounds of V, H and CAP (CAP <= V).
    with_bias : None or bool
        Whether the head has a bias; drawn when None.
    """
    kind = draw(st.sampled_from(count_kinds))
    vocab = draw(st.one_of(st.integers(2, max_vocab), st.just(111)))
    hidden = draw(st.integers(1, max_hidden))
    cap = draw(st.integers(1, min(vocab, max_cap)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # weight ~ N(0, 1/H) and hidden ~ N(0, 2^2) (hidden_for) give logits of std ~2:
    # live fp32 probabilities stay far above underflow, so none ties with the 0 of
    # the inactive rows in a softmax top-k.
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    has_bias = draw(st.booleans()) if with_bias is None else with_bias
    bias = torch.randn(vocab, generator=gen) if has_bias else None
    state = empty_state(weight, cap, bias)
    if kind == "empty":
        return state
    if kind == "one":
        tok = draw(st.integers(0, vocab - 1))
        observe_reference(state.vocab_state, weight, torch.tensor([tok, tok]), pin=draw(st.booleans()))
        return state
    n_pinned = draw(st.integers(0, min(2, cap - 1)))
    if n_pinned:
        pins = torch.randperm(vocab, generator=gen)[:n_pinned]
        observe_reference(state.vocab_state, weight, pins, pin=True)
    for _ in range(draw(st.integers(1, 4))):
        present = state.ids[: state.n]
        observe_reference(state.vocab_state, weight, draw(token_batch(vocab, present)))
    if kind == "full":
        # Every id once: more new ids than free rows, so the last call evicts
        # whenever the earlier batches had filled some rows.
        observe_reference(state.vocab_state, weight, torch.randperm(vocab, generator=gen))
    elif state.n == 0:
        observe_reference(state.vocab_state, weight, torch.tensor([0]))
    return state


@st.composite
def hidden_for(draw, state: HeadState, max_rows: int = 5):
    """Hidden states [N, H] in the head dtype, N in [1, max_rows], std 2."""
    n_rows = draw(st.integers(1, max_rows))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, state.weight.shape[1], generator=gen) * 2.0
    return h.to(state.weight.dtype)


def k_for(state: HeadState, max_k: int = 8):
    """Top-k sizes valid for the op: ``1 <= k <= min(CAP, max_k)``; k may exceed count."""
    return st.integers(1, max(1, min(state.cap, max_k)))


@st.composite
def head_cases(draw, **state_kwargs):
    """``(state, hidden [N, H], k, normalize)`` for a head call; kwargs go to vocab_states."""
    state = draw(vocab_states(**state_kwargs))
    return state, draw(hidden_for(state)), draw(k_for(state)), draw(st.sampled_from(NORMALIZE))


# ----------------------------------------------------------------- checkers

def fp64_scores(state: HeadState, hidden: torch.Tensor, normalize: str) -> torch.Tensor:
    """[N, count] fp64 scores of the active rows, normalised over them."""
    n = state.n
    rows, ids = state.rows[:n].cpu().double(), state.ids[:n].cpu()
    scores = hidden.cpu().double() @ rows.t()
    if state.bias is not None:
        scores = scores + state.bias.cpu().double()[ids]
    if normalize == "softmax" and n:
        scores = torch.softmax(scores, -1)
    if normalize == "log_softmax" and n:
        scores = torch.log_softmax(scores, -1)
    return scores


def check_topk(values, token_ids, state, hidden, k, normalize):
    """Assert that (values, token_ids) [N, k] is a valid top-k of the fp64 scores."""
    n_rows = hidden.shape[0]
    assert values.shape == token_ids.shape == (n_rows, k)
    assert values.dtype == hidden.dtype and token_ids.dtype == torch.int64
    values, token_ids = values.cpu().double(), token_ids.cpu()
    fill = 0.0 if normalize == "softmax" else float("-inf")
    nv = min(k, state.n)
    assert (token_ids[:, nv:] == -1).all() and (values[:, nv:] == fill).all()
    got, got_ids = values[:, :nv], token_ids[:, :nv]
    assert not torch.isnan(got).any()
    rows_of = state.member.cpu()[got_ids.clamp(min=0)]
    assert (got_ids >= 0).all() and (rows_of >= 0).all() and (rows_of < state.n).all()
    assert all(len(set(r.tolist())) == nv for r in got_ids)
    assert (got[:, :-1] >= got[:, 1:]).all(), "values are not sorted"
    expected = fp64_scores(state, hidden, normalize)
    torch.testing.assert_close(got, expected.gather(1, rows_of), **tol(hidden.dtype))
    torch.testing.assert_close(got, expected.topk(nv, dim=-1).values, **tol(hidden.dtype))


def check_full(out, state, hidden, vocab_size, normalize):
    """Assert that ``out`` [N, V] is the fp64 full output within tolerance, fill exact."""
    assert out.shape == (hidden.shape[0], vocab_size) and out.dtype == hidden.dtype
    fill = 0.0 if normalize == "softmax" else float("-inf")
    expected = torch.full(out.shape, fill, dtype=torch.float64)
    expected[:, state.ids[: state.n].cpu()] = fp64_scores(state, hidden, normalize)
    torch.testing.assert_close(out.cpu().double(), expected, **tol(hidden.dtype))
    inactive = torch.ones(vocab_size, dtype=torch.bool)
    inactive[state.ids[: state.n].cpu()] = False
    assert (out.cpu().double()[:, inactive] == fill).all()


def live_tokens(state: HeadState) -> dict:
    """token id -> last_seen of the live rows."""
    n = state.n
    return dict(zip(state.ids[:n].tolist(), state.last_seen[:n].tolist()))


def check_invariants(state, weight: torch.Tensor | None = None, pinned=()):
    """The invariants every observe keeps (layout in ``kernels/state.py``).

    Parameters
    ----------
    state : HeadState, ActiveVocab or VocabState (then ``weight`` [V, H] is needed)
    weight : the full head weight, when ``state`` does not carry it
    pinned : token ids that must be active (never evicted)
    """
    if weight is None:
        weight = state.weight
    state = state.vocab_state if isinstance(state, HeadState) else state
    state = state.state() if callable(getattr(state, "state", None)) else state
    n, cap, vocab = state.size, state.capacity, state.vocab_size
    assert 0 <= n <= cap
    live = state.ids[:n]
    assert ((live >= 0) & (live < vocab)).all() and len(set(live.tolist())) == n
    assert (state.ids[n:] == vocab).all()
    assert torch.equal(state.member[live], torch.arange(n))
    assert int((state.member[:vocab] >= 0).sum()) == n and int(state.member[vocab]) == -1
    assert torch.equal(state.rows[:n], weight[live].to(state.rows.dtype))
    assert set(pinned) <= set(live.tolist()), "a pinned id was evicted"
