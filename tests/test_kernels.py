"""Triton kernels and the Inductor decomposition against the references.

Device: CUDA tensors with natively compiled Triton when a GPU is present and
``TRITON_INTERPRET`` is unset (``bench/gpu_check.sh``); otherwise CPU tensors through the
Triton interpreter, enabled below before any kernel module is imported (``triton.jit``
picks the interpreter at decoration time). Shapes stay tiny: an interpreted program
instance costs ~0.7 ms.

Expectations, checkers and their tolerances (fp64 based, justified there) live in
``strategies.py``.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import shutil

import torch

NATIVE = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and NATIVE else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from microspec_compile.kernels import ops  # noqa: E402  (defines torch.ops.microspec)
from microspec_compile.kernels.reference import (  # noqa: E402
    PINNED,
    observe_reference,
    sparse_full_reference,
    sparse_topk_reference,
)

from strategies import (  # noqa: E402
    NORMALIZE,
    check_full,
    check_invariants,
    check_topk,
    empty_state,
    head_cases,
    live_tokens,
    token_batch,
    tol,
    vocab_states,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton

    from microspec_compile.kernels import triton_observe as tobs
    from microspec_compile.kernels import triton_sparse_head as tsh

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# The interpreter runs masked lanes too (padding rows: -inf - -inf; count 0: log(0));
# their results are discarded by the masks, numpy's warnings are noise.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
# Derandomized (the same examples on every run, CI-stable), no example database written
# into the tree, no shrinking (an interpreted shrink can take minutes; the failing example
# is printed as drawn).
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def poisoned_buffers():
    """Kernel buffers start as NaN / INT64_MIN, so unwritten or unmasked elements fail."""
    if not HAS_TRITON:
        yield
        return
    if DEVICE == "cpu" and type(tsh._tile_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernels were imported before TRITON_INTERPRET=1 was set")
    old, tsh.POISON = tsh.POISON, True
    yield
    tsh.POISON = old


# ----------------------------------------------------------------- Triton sparse head

@needs_triton
@settings(max_examples=40, **SETTINGS)
@given(head_cases())
def test_triton_topk_matches_fp64(case):
    state, hidden, k, normalize = case
    dev = state.to(DEVICE)
    values, token_ids = tsh.sparse_topk_triton(
        hidden.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias, k, normalize)
    check_topk(values, token_ids, state, hidden, k, normalize)


@needs_triton
@settings(max_examples=50, **SETTINGS)
@given(head_cases())
def test_triton_full_matches_fp64(case):
    state, hidden, _, normalize = case
    dev = state.to(DEVICE)
    out = tsh.sparse_full_triton(
        hidden.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias, state.vocab, normalize)
    check_full(out, state, hidden, state.vocab, normalize)


@settings(max_examples=40, **SETTINGS)
@given(head_cases(count_kinds=("one", "partial", "full")))
def test_reference_meets_tolerance(case):
    """The checkers and tolerances are not stricter than the fp32 reference itself.

    count 0 is left out: the reference's softmax / log-softmax of an all -inf row is NaN.
    """
    state, hidden, k, normalize = case
    args = (hidden, state.rows, state.ids, state.count, state.bias)
    check_topk(*sparse_topk_reference(*args, k, normalize), state, hidden, k, normalize)
    full = sparse_full_reference(*args, state.vocab, normalize)
    check_full(full, state, hidden, state.vocab, normalize)


def _state_with(vocab, hidden, cap, n_active, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    state = empty_state(weight, cap, torch.randn(vocab, generator=gen) if bias else None)
    if n_active:
        observe_reference(state.vocab_state, weight, torch.randperm(vocab, generator=gen)[:n_active])
    return state


# (n_rows, hidden, cap, n_active, k, vocab, dtype): why each case exists. Tile sizes as
# interpreted (32-row tiles for N <= 16); a GPU's 16-row tiles meet the same edges.
EDGE_CASES = [
    (1, 1, 1, 1, 1, 2, torch.float32),        # every dimension minimal, CAP 1
    (17, 65, 33, 33, 5, 111, torch.float32),  # N > BLOCK_N=16, H > BLOCK_K=64, tile 2: 1 live row
    (3, 130, 64, 32, 3, 111, torch.bfloat16),  # H > BLOCK_K=128; count on a tile edge: tile 2 skipped
    (2, 24, 70, 9, 64, 111, torch.float16),   # k=64 (C=64, BLOCK_R=64) > count: -1 / fill tail
    (64, 8, 40, 40, 2, 111, torch.bfloat16),  # N=64, the largest row block; vocabulary full
    (2, 16, 100, 100, 2, 32000, torch.bfloat16),  # a real-sized vocabulary for the fill
]


@needs_triton
@pytest.mark.parametrize("n_rows,hidden,cap,n_active,k,vocab,dtype", EDGE_CASES)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_triton_head_edge_shapes(n_rows, hidden, cap, n_active, k, vocab, dtype, normalize):
    state = _state_with(vocab, hidden, cap, n_active, dtype, seed=n_rows)
    # A strided view, as HF's hidden[:, -1, :] reaches the head: stride(0) = 2 * H.
    parent = (torch.randn(n_rows, 2, hidden, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    x, x_dev = parent[:, 1], parent.to(DEVICE)[:, 1]
    dev = state.to(DEVICE)
    args = (x_dev, dev.rows, dev.ids, dev.count, dev.bias)
    values, token_ids = tsh.sparse_topk_triton(*args, k, normalize)
    check_topk(values, token_ids, state, x, k, normalize)
    check_full(tsh.sparse_full_triton(*args, vocab, normalize), state, x, vocab, normalize)


@needs_triton
@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "dot"])  # the tile kernel
@pytest.mark.parametrize("k", [1, 3])  # argmax path (max reduction) and bitonic top-k
def test_triton_multilevel_merge(monkeypatch, k, gemv):
    """Force several merge levels (groups of 2 tiles) on a tiny state: 100 rows, 4 tiles."""
    monkeypatch.setattr(tsh, "_MERGE_KEYS", 2)
    monkeypatch.setattr(tsh, "GEMV_MERGE_KEYS", 2)
    monkeypatch.setattr(tsh, "GEMV_MAX_ROWS", 8 if gemv else 0)
    assert _pick(2, torch.float32).gemv == gemv
    state = _state_with(120, 12, 100, 97, torch.float32)
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(3)) * 2
    dev = state.to(DEVICE)
    args = (x.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias)
    for normalize in NORMALIZE:
        values, token_ids = tsh.sparse_topk_triton(*args, k, normalize)
        check_topk(values, token_ids, state, x, k, normalize)
        check_full(tsh.sparse_full_triton(*args, 120, normalize), state, x, 120, normalize)


@needs_triton
def test_triton_topk_beyond_64_uses_the_reference():
    """k > 64 (allowed by the op up to CAP) falls back to the capturable reference."""
    state = _state_with(200, 8, 80, 70, torch.float32)
    x = torch.randn(2, 8)
    dev = state.to(DEVICE)
    values, token_ids = tsh.sparse_topk_triton(
        x.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias, 72, "softmax")
    check_topk(values, token_ids, state, x, 72, "softmax")


@needs_triton
def test_triton_empty_vocabulary():
    """count 0 (the op raises; the kernels still answer): fill values, id -1, every mode.

    The reference returns NaN here for softmax / log_softmax (softmax of an all -inf
    row); the kernels return the documented fill (0 / -inf) instead.
    """
    state = _state_with(50, 8, 16, 0, torch.float32)
    x = torch.randn(3, 8)
    dev = state.to(DEVICE)
    args = (x.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias)
    for normalize in NORMALIZE:
        values, token_ids = tsh.sparse_topk_triton(*args, 4, normalize)
        full = tsh.sparse_full_triton(*args, 50, normalize)
        fill = 0.0 if normalize == "softmax" else float("-inf")
        assert (token_ids.cpu() == -1).all() and (values.cpu() == fill).all()
        assert (full.cpu() == fill).all()


# ----------------------------------------------------------------- GEMV tile kernel

def _pick(n_rows, dtype, gemv=None):
    """The tunables a call of ``n_rows`` rows gets here (interpreted on CPU)."""
    return tsh.pick_tunables(n_rows, dtype, DEVICE == "cpu", gemv)


def _gemv_cases():
    """A covering array over N x count kind (every pair of N, count kind, k, dtype and
    bias appears at least once; every case runs all three normalize modes): 20 cases,
    where the full product would be 240."""
    cases = []
    for i, (n, counts) in enumerate(itertools.product(GEMV_ROWS, GEMV_COUNTS)):
        combo = (i % 4 + i // 4) % 4
        dtype, bias = (torch.float32, torch.bfloat16)[combo % 2], combo < 2
        k = (1, 3, 10)[(i + i // 4) % 3]
        cases.append(pytest.param(n, counts, k, dtype, bias, id=f"n{n}-{counts}-k{k}-"
                                  f"{str(dtype)[6:]}-{'bias' if bias else 'nobias'}"))
    return cases


GEMV_ROWS = (1, 2, 3, 5, 8)
# With R = the GEMV tile's BLOCK_R and CAP = 2R + 6: count R (a tile edge: tile 2 is
# skipped), R + 1 (tile 2 holds one live row), 2R - 3 (ends inside tile 2), CAP (full).
GEMV_COUNTS = ("edge", "edge_plus_1", "partial", "full")


@needs_triton
@pytest.mark.parametrize("n_rows,counts,k,dtype,bias", _gemv_cases())
def test_gemv_head_matches_reference(n_rows, counts, k, dtype, bias):
    """The GEMV tile kernel (picked for N <= GEMV_MAX_ROWS) against the references and
    the fp64 checkers: top-k and full output, every normalize mode."""
    tunables = _pick(n_rows, dtype)
    assert tunables.gemv and tunables.block_n == min(8, triton.next_power_of_2(n_rows))
    block_r = tunables.block_r
    cap = 2 * block_r + 6
    count = {"edge": block_r, "edge_plus_1": block_r + 1, "partial": 2 * block_r - 3,
             "full": cap}[counts]
    vocab, hidden = 160 + cap, 40
    state = _state_with(vocab, hidden, cap, count, dtype, bias=bias, seed=n_rows + count)
    assert state.n == count
    parent = (torch.randn(n_rows, 2, hidden, generator=torch.Generator().manual_seed(k)) * 2)
    x = parent.to(dtype)[:, 1]  # strided, as HF's hidden[:, -1, :]
    dev = state.to(DEVICE)
    args = (x.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias)
    ref_args = (x, state.rows, state.ids, state.count, state.bias)
    for normalize in NORMALIZE:
        values, token_ids = tsh.sparse_topk_triton(*args, k, normalize)
        check_topk(values, token_ids, state, x, k, normalize)
        ref_values, ref_ids = sparse_topk_reference(*ref_args, k, normalize)
        assert torch.equal(token_ids.cpu(), ref_ids), normalize
        torch.testing.assert_close(values.cpu(), ref_values, **tol(dtype))
        full = tsh.sparse_full_triton(*args, vocab, normalize)
        check_full(full, state, x, vocab, normalize)
        torch.testing.assert_close(full.cpu(), sparse_full_reference(*ref_args, vocab, normalize),
                                   **tol(dtype))


@needs_triton
@pytest.mark.parametrize("n_rows,dtype", [(1, torch.bfloat16), (5, torch.float32),
                                          (8, torch.bfloat16), (9, torch.float32)])
def test_gemv_and_dot_paths_agree(n_rows, dtype):
    """Both tile kernels at the same shapes give the same ids and values (within the
    dtype's tolerance: two fp32 summation orders), each valid against fp64. N = 9 runs
    the GEMV kernel forced past its threshold (two row blocks of 8); ``gemv_small``:
    16-row, 16-feature tiles and 32 keys per merge program, so several K steps, 5 tiles
    and two merge levels."""
    interp = DEVICE == "cpu"
    variants = {"dot": _pick(n_rows, dtype, gemv=False), "gemv": _pick(n_rows, dtype, gemv=True),
                "gemv_small": tsh.Tunables(True, min(8, triton.next_power_of_2(n_rows)), 16, 16, 32)}
    assert not variants["dot"].gemv and variants["dot"].block_n >= 16
    assert tsh.pick_tunables(n_rows, dtype, interp).gemv == (n_rows <= tsh.GEMV_MAX_ROWS)
    vocab, hidden = 120, 40
    state = _state_with(vocab, hidden, 70, 65, dtype, seed=n_rows)
    x = (torch.randn(n_rows, hidden, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    dev = state.to(DEVICE)
    args = (x.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias)
    for normalize, k in zip(NORMALIZE, (3, 1, 3)):
        got = {}
        for name, tunables in variants.items():
            values, token_ids = tsh.sparse_topk_triton(*args, k, normalize, tunables=tunables)
            check_topk(values, token_ids, state, x, k, normalize)
            full = tsh.sparse_full_triton(*args, vocab, normalize, tunables=tunables)
            check_full(full, state, x, vocab, normalize)
            got[name] = (values.cpu(), token_ids.cpu(), full.cpu())
        want = got.pop("dot")
        for name, (values, token_ids, full) in got.items():
            msg = f"{name} vs dot, {normalize}"
            assert torch.equal(token_ids, want[1]), msg
            torch.testing.assert_close(values, want[0], msg=msg, **tol(dtype))
            torch.testing.assert_close(full, want[2], msg=msg, **tol(dtype))


# ----------------------------------------------------------------- Triton observe

def assert_same_state(got, want):
    """Two vocabulary states are the same: every field equal, rows compared on the live
    prefix (the scratch row's contents are not part of the state)."""
    got, want = got.vocab_state.to("cpu"), want.vocab_state.to("cpu")
    for name, a, b in zip(got._fields, got, want):
        if name == "rows":
            a, b = a[: int(got.count)], b[: int(want.count)]
        assert torch.equal(a, b), f"{name} differs:\n{a}\n{b}"


def by_token(values, token_ids, vocab):
    """Top-k ``values [N, k]`` scattered to their ids ``[N, k]`` in a ``[N, vocab + 1]``
    NaN-filled table (id -1 to the last column): equal tables mean the same ids with the
    same values, whatever order ties took."""
    values, token_ids = values.float().cpu(), token_ids.cpu()
    table = torch.full((values.shape[0], vocab + 1), float("nan"))
    return table.scatter_(1, torch.where(token_ids < 0, vocab, token_ids), values)


# Which of the kernels' devices this machine runs: CPU tensors through the interpreter
# without a GPU, CUDA tensors natively with one. The same test, the device a parameter.
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(DEVICE != "cpu", reason="Triton runs natively")),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")]),
]


@needs_triton
@settings(max_examples=80, **SETTINGS)
@given(st.data())
def test_triton_observe_against_reference(data):
    """The kernel's state after each call is the reference's, field for field, whether
    the call fits, evicts (ties in last_seen broken by token id) or overflows.
    Each call starts both from the same state (no drift across calls)."""
    state = data.draw(vocab_states(max_vocab=40, max_hidden=12, max_cap=12))
    for _ in range(data.draw(st.integers(1, 4))):
        tokens = data.draw(token_batch(state.vocab, state.ids[: state.n], max_len=16))
        pin = data.draw(st.sampled_from([False, False, False, True]))
        ref = state.clone()
        observe_reference(ref.vocab_state, state.weight, tokens, pin)
        dev = state.to(DEVICE)
        tobs.observe_triton(dev.vocab_state, dev.weight, tokens.to(DEVICE), pin)
        state = dev.to("cpu")
        check_invariants(state)
        assert_same_state(state, ref)


@needs_triton
def test_triton_observe_overflow_all_pinned():
    """Capacity full of pinned ids: new ids are dropped, nothing is evicted, count stays."""
    weight = torch.randn(30, 4)
    state = empty_state(weight, 3)
    observe_reference(state.vocab_state, weight, torch.tensor([5, 6, 7]), pin=True)
    dev = state.to(DEVICE)
    tobs.observe_triton(dev.vocab_state, dev.weight, torch.tensor([1, 2, 5, 2], device=DEVICE))
    after = dev.to("cpu")
    check_invariants(after)
    assert live_tokens(after) == {5: PINNED, 6: PINNED, 7: PINNED} and int(after.step) == 2


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_every_kernel_keeps_the_same_vocabulary(device):
    """One sequence of calls that fills, evicts (every call's ids share one last_seen, so
    eviction ties are the rule) and overflows: the reference, the CPU kernels, the Triton
    kernels, the registered ops and the asynchronous gather all end each call in the same
    state, and the head gives the same values for the same ids."""
    from microspec_compile.kernels.cpu_head import observe_cpu

    vocab, hidden, cap = 300, 32, 48
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(torch.bfloat16)
    x = (torch.randn(4, hidden, generator=gen) * 2).to(torch.bfloat16)
    calls = [(torch.randint(0, vocab, (n,), generator=gen), False) for n in (40, 30, 70, 5, 90)]
    calls.insert(1, (torch.tensor([7, 8, 9]), True))
    five = calls[4][0]  # ids all present: the CPU kernel's refresh on host views
    calls[5:5] = [(five, False), (five[:2], True), (torch.tensor([9, 8]), False)]
    calls.append((torch.arange(vocab - 100, vocab), False))  # more new ids than fit
    ref = empty_state(weight, cap)
    host = {"cpu": ref.clone()}
    dev = {name: ref.clone().to(device) for name in ("triton", "op", "start_wait")}
    evicted = False
    for tokens, pin in calls:
        before = set(live_tokens(ref))
        observe_reference(ref.vocab_state, weight, tokens, pin)
        evicted |= bool(before - set(live_tokens(ref)))
        observe_cpu(host["cpu"].vocab_state, weight, tokens, pin)
        t = tokens.to(device)
        tobs.observe_triton(dev["triton"].vocab_state, dev["triton"].weight, t, pin)
        torch.ops.microspec.observe(*dev["op"].vocab_state, dev["op"].weight, t, pin, "triton")
        state = dev["start_wait"]
        ops.observe_start(state.vocab_state, state.weight, t, pin, path="triton")
        ops.observe_wait(x.to(device), t, state.vocab_state)
        want = by_token(*sparse_topk_reference(x, ref.rows, ref.ids, ref.count, None, 8,
                                               "softmax"), vocab)
        for name, state in [*host.items(), *dev.items()]:
            assert_same_state(state, ref)
            got = tsh.sparse_topk_triton(x.to(device), state.rows.to(device),
                                         state.ids.to(device), state.count.to(device), None, 8,
                                         "softmax")
            torch.testing.assert_close(by_token(*got, vocab), want, equal_nan=True,
                                       msg=f"{name}: other values by token id",
                                       **tol(torch.bfloat16))
    assert evicted and ref.n == cap


# ----------------------------------------------------------------- ops and opcheck

def _op_args(seed=0):
    state = _state_with(111, 16, 24, 10, torch.float32, seed=seed)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(seed))
    return state, x


@pytest.mark.parametrize(
    "path,device", [("torch", "cpu"), pytest.param("triton", DEVICE, marks=needs_triton)])
def test_opcheck(path, device):
    """Schema, fake (meta) functions, autograd registration and AOT dispatch of the ops."""
    state, x = _op_args()
    state, x = state.to(device), x.to(device)
    st_args = (state.rows, state.ids, state.count, state.bias)
    torch.library.opcheck(torch.ops.microspec.sparse_topk.default, (x, *st_args, 5, "log_softmax", path))
    torch.library.opcheck(torch.ops.microspec.sparse_full.default, (x, *st_args, 111, "softmax", path))
    tokens = torch.tensor([[1, 2], [2, 90]], device=device)
    torch.library.opcheck(torch.ops.microspec.observe.default,
                          (*state.vocab_state, state.weight, tokens, False, path))


@needs_triton
def test_ops_route_to_triton():
    """path="triton" through the registered ops: 3-D hidden, results as the reference's."""
    state, x = _op_args(1)
    dev = state.to(DEVICE)
    args = (x.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias)
    values, token_ids = torch.ops.microspec.sparse_topk(*args, 4, "none", path="triton")
    assert values.shape == token_ids.shape == (2, 3, 4)
    check_topk(values.reshape(6, 4), token_ids.reshape(6, 4), state, x.reshape(6, 16), 4, "none")
    full = torch.ops.microspec.sparse_full(*args, 111, "log_softmax", path="triton")
    check_full(full.reshape(6, 111), state, x.reshape(6, 16), 111, "log_softmax")
    tokens = torch.tensor([7, 7, 100], device=DEVICE)
    torch.ops.microspec.observe(*dev.vocab_state, dev.weight, tokens, path="triton")
    check_invariants(dev.to("cpu"))
    assert {7, 100} <= live_tokens(dev.to("cpu")).keys()


# ----------------------------------------------------------------- Inductor decomposition

INDUCTOR_SHAPE = dict(vocab=111, hidden=24, cap=40, n_rows=3, k=4)
# Four of the six (op, normalize) pairs keep the compile short; every mode appears, and
# full log_softmax shares its epilogue with the top-k's.
INDUCTOR_OPS = (("topk", "log_softmax"), ("topk", "none"), ("full", "none"), ("full", "softmax"))


@functools.cache
def _inductor_compiled(dtype):
    """One compiled graph per dtype: INDUCTOR_OPS in one graph. Returns (fn, code)."""
    from torch._inductor.utils import run_and_get_code

    from microspec_compile.kernels.inductor_head import compile_with_decompositions

    s = INDUCTOR_SHAPE

    def head(hidden, rows, ids, count, bias):
        outs = []
        for op, normalize in INDUCTOR_OPS:
            if op == "topk":
                top = torch.ops.microspec.sparse_topk(hidden, rows, ids, count, bias, s["k"], normalize)
                outs += [top[0], top[1]]  # a traced tuple is indexed, not iterated
            else:
                outs.append(torch.ops.microspec.sparse_full(
                    hidden, rows, ids, count, bias, s["vocab"], normalize))
        return tuple(outs)

    gm = torch.fx.symbolic_trace(head)
    state = _state_with(s["vocab"], s["hidden"], s["cap"], 20, dtype).to(DEVICE)
    x = torch.randn(s["n_rows"], s["hidden"]).to(dtype).to(DEVICE)
    inputs = [x, state.rows, state.ids, state.count, state.bias]

    def build():
        compiled = compile_with_decompositions(gm, inputs)
        compiled(*inputs)
        return compiled

    compiled, code = run_and_get_code(build)  # the code is generated inside compile_fx
    return compiled, "\n".join(code)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_generates_mm_and_epilogue(dtype):
    _, code = _inductor_compiled(dtype)
    assert "torch.ops.microspec" not in code, "the opaque op survived the decomposition"
    assert "extern_kernels.mm" in code or "extern_kernels.addmm" in code
    assert "cpp_fused" in code or "triton_" in code  # the generated epilogue


@settings(max_examples=50, **SETTINGS)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_inductor_matches_fp64(data, dtype):
    s = INDUCTOR_SHAPE
    compiled, _ = _inductor_compiled(dtype)
    weight = torch.randn(s["vocab"], s["hidden"]).to(dtype)
    state = empty_state(weight, s["cap"], torch.randn(s["vocab"]))
    for _ in range(data.draw(st.integers(1, 3))):  # count 1 .. full, evictions included
        tokens = data.draw(token_batch(s["vocab"], max_len=30))
        observe_reference(state.vocab_state, state.weight, tokens)
    if state.n == 0:
        observe_reference(state.vocab_state, state.weight, torch.tensor([110]))
    x = (torch.randn(s["n_rows"], s["hidden"]) * 2).to(dtype)
    dev = state.to(DEVICE)
    outs = list(compiled(x.to(DEVICE), dev.rows, dev.ids, dev.count, dev.bias))
    for op, normalize in INDUCTOR_OPS:
        if op == "topk":
            values, token_ids = outs.pop(0), outs.pop(0)
            check_topk(values, token_ids, state, x, s["k"], normalize)
        else:
            check_full(outs.pop(0), state, x, s["vocab"], normalize)


@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="the smoke run is the interpreter's")
def test_head_latency_variants_smoke(monkeypatch, capsys):
    """``bench/gpu_head_latency.py --variants`` (the GPU tuning table) runs both tile
    kernels, interpreted, on its smoke shapes: a line each, no failure, ids agreeing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "bench"))
    monkeypatch.setattr(tsh, "GEMV_MAX_ROWS", tsh.GEMV_MAX_ROWS)  # --gemv-max-rows sets it
    import gpu_head_latency

    gpu_head_latency.main(["--device", "cpu", "--smoke", "--k", "3", "--variants",
                           "--gemv-max-rows", "2"])
    out = capsys.readouterr().out
    assert "failed" not in out
    for kind in ("dot", "gemv"):
        assert [line.split()[2] for line in out.splitlines()
                if line.startswith(f"triton_{kind} ")] == ["1", "3"], out
    assert tsh.GEMV_MAX_ROWS == 2


# ----------------------------------------------------------------- GPU compile check

def _bundled_ptxas() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(path) or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _bundled_ptxas(), reason="no ptxas to compile for a GPU")
def test_kernels_compile_for_sm90():
    """Compile (not run) three kernels for an H100/H200 (sm_90) with Triton's bundled ptxas.

    Catches what the interpreter accepts and a GPU rejects (tl.dot blocks < 16, dtype
    mixes, scalar atomics) on a machine without a GPU. In a subprocess
    (``bench/gpu_head_latency.py --compile-check``): the compiler must not see
    TRITON_INTERPRET nor the interpreter's patched ``tl`` functions.
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "bench/gpu_head_latency.py", "--compile-check"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled for sm_90" in done.stdout, done.stderr[-3000:]
