"""The CPU head and observe agree with the capturable references."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microspec_compile.kernels.cpu_head import observe_cpu, sparse_full_cpu, sparse_topk_cpu
from microspec_compile.kernels.reference import (
    observe_reference,
    sparse_full_reference,
    sparse_topk_reference,
)
from microspec_compile.vocab import ActiveVocab

# Tolerances: fp32 matches to rounding; bf16/fp16 score in the weight's dtype on CPU
# (oneDNN accumulates in fp32 but rounds the output), one ulp of a |logit| <~ 8.
TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("n_active", [1, 7, 32])  # one row, some rows, full capacity
@pytest.mark.parametrize("k", [1, 5, 40])  # argmax, EAGLE-ish, more than the active rows
@pytest.mark.parametrize("normalize", ["none", "softmax", "log_softmax"])
def test_cpu_head_matches_reference(dtype, n_active, k, normalize):
    torch.manual_seed(n_active)
    vocab_size, hidden = 111, 16  # odd vocabulary on purpose
    vocab = ActiveVocab(torch.randn(vocab_size, hidden, dtype=dtype), capacity=32 if k <= 32 else 64)
    vocab.observe(torch.randperm(vocab_size)[:n_active])
    x = torch.randn(3, hidden, dtype=dtype)
    bias = torch.randn(vocab_size, dtype=dtype)
    state = (vocab.rows, vocab.ids, vocab.count, bias)
    tol = TOL[dtype]
    values, ids = sparse_topk_cpu(x, *state, k, normalize)
    ref_values, ref_ids = sparse_topk_reference(x, *state, k, normalize)
    torch.testing.assert_close(values.float(), ref_values.float(), rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert torch.equal(ids, ref_ids)
    assert ((ids == -1) == (ref_ids == -1)).all()
    full = sparse_full_cpu(x, *state, vocab_size, normalize)
    ref_full = sparse_full_reference(x, *state, vocab_size, normalize)
    torch.testing.assert_close(full.float(), ref_full.float(), rtol=tol, atol=tol)


# Calls drawn from a pool of 12 ids: most calls re-observe active ids (the shortcut),
# some bring new ids into free rows (the free-rows path), some pin; with capacity 8 some
# must evict (the reference path), with capacity 16 none does.
@settings(max_examples=80, deadline=None)
@given(calls=st.lists(st.tuples(st.lists(st.integers(0, 11), max_size=5), st.booleans()),
                      min_size=1, max_size=30), capacity=st.sampled_from([8, 16]))
def test_cpu_observe_matches_reference_state(calls, capacity):
    weight = torch.randn(111, 4)
    fast, ref = ActiveVocab(weight, capacity=capacity), ActiveVocab(weight, capacity=capacity)
    for tokens, pin in calls:
        tokens = torch.tensor(tokens, dtype=torch.int64)
        observe_cpu(fast.state(), weight, tokens, pin)
        observe_reference(ref.state(), weight, tokens, pin)
        assert torch.equal(fast.rows[:-1], ref.rows[:-1])  # the last row is scratch
        for a, b in zip(fast.state()[1:], ref.state()[1:]):
            assert torch.equal(a, b)
