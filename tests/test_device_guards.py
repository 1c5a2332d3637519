"""Guards that catch on a CPU what breaks or stalls on a GPU (issue 23).

A CPU run cannot see a CPU tensor meet a CUDA one, nor a host sync. Two guards make
those bugs visible here anyway; each records the library line that offends, and the
tests assert that nothing was recorded:

* :class:`DeviceGuard` (a ``TorchFunctionMode``): every tensor factory called from the
  library (``microspec_compile/``, ``kernels/``, ``passes/``) must name its device
  (``torch.zeros(n)`` lands on the CPU whatever the model's device: the EAGLE loop's
  expansion mask crashed on CUDA that way); *_like / new_* factories inherit theirs.
  Library calls whose tensor arguments sit on several devices are recorded too (on a
  GPU run; a 0-dim CPU tensor is a scalar, allowed; ``.to`` / ``copy_`` move by design).
  It runs the EAGLE-2 loop (dense and microspec scorers), the lookup loop, the chain
  loop and the training step.
* :class:`SyncGuard` (a ``TorchFunctionMode`` and a ``TorchDispatchMode``): no host read
  (``.item()``, ``.tolist()``, ``int()`` / ``bool()`` of a tensor, ``.cpu()``,
  ``aten._local_scalar_dense``), no data-dependent shape (``nonzero``, boolean
  indexing) and no Python value copied into a tensor (``aten.lift_fresh``:
  ``t[i] = 0`` and ``torch.tensor(...)``, a blocking host-to-device copy on CUDA and
  illegal in CUDA-graph capture) in the capturable references, the Triton kernels
  (interpreted here), the registered ops on their device path (``path="triton"``) and
  the compiled draft step's ops. The CPU kernels (``cpu_head``) read the host by
  design and are not guarded.

Only frames of the library count: the first frame outside torch decides, so
transformers' and the Triton interpreter's own work is not ours to judge.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import microspec_compile as ms
import microspec_compile.kernels
import microspec_compile.passes
from microspec_compile.kernels import ops
from microspec_compile.kernels.state import VocabState

HAS_CUDA = torch.cuda.is_available()
# The Triton kernels run on CUDA natively, on CPU tensors through the interpreter
# (conftest.py sets TRITON_INTERPRET when there is no GPU).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KERNEL_DEVICE = "cpu" if INTERPRETED or not HAS_CUDA else "cuda"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device")])]
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


# ----------------------------------------------------------------- where a call comes from

def _real(path: str) -> str:
    return os.path.realpath(path)


LIBRARY = tuple(sorted({_real(os.path.dirname(ms.__file__)) + os.sep,
                        _real(microspec_compile.kernels.__path__[0]) + os.sep,
                        _real(microspec_compile.passes.__path__[0]) + os.sep}))
TORCH = _real(os.path.dirname(torch.__file__)) + os.sep
THIS = _real(__file__)


def library_caller(through_torch: bool = True) -> str | None:
    """``file:line (function)`` of the first frame outside torch and this file, if that
    frame is library code; None otherwise (transformers, Triton, tests).
    ``through_torch=False``: None when torch itself made the call (e.g. an optimizer's
    CPU step counter, on the host by torch's design)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = _real(frame.f_code.co_filename)
        if path == THIS:
            frame = frame.f_back
            continue
        if path.startswith(TORCH):
            if not through_torch:
                return None
            frame = frame.f_back
            continue
        if path.startswith(LIBRARY):
            root = next(r for r in LIBRARY if path.startswith(r))
            short = os.path.join(os.path.basename(root.rstrip(os.sep)), path[len(root):])
            return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        return None
    return None


def _tensors(value, out: list) -> list:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tensors(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, out)
    return out


def _name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


# ----------------------------------------------------------------- the device guard

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
             torch.as_tensor, torch.asarray, torch.eye, torch.rand, torch.randn, torch.randint,
             torch.randperm, torch.linspace, torch.logspace, torch.scalar_tensor,
             torch.empty_strided, torch.tril_indices, torch.triu_indices}


# Calls that move data between devices by design (a CPU index into a CUDA tensor is not
# one of them: torch copies it to the device first, a hidden host-to-device copy).
MOVES = {"to", "copy_", "cpu", "cuda", "type_as", "new_tensor", "__get__"}


class DeviceGuard(TorchFunctionMode):
    """Records library factory calls without ``device=`` and ops that mix devices."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # traced into a graph: judged where it was written
            return func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None and not (
                func in (torch.as_tensor, torch.asarray) and args
                and isinstance(args[0], torch.Tensor)):
            where = library_caller(through_torch=False)
            if where is not None:
                self.violations.append(f"{where}: torch.{_name(func)}(...) without device=")
        if _name(func) not in MOVES:
            devices = {t.device for t in _tensors((args, kwargs), [])
                       if not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                where = library_caller()  # elsewhere (transformers) torch itself would raise
                if where is not None:
                    self.violations.append(
                        f"{where}: {_name(func)} mixes {sorted(map(str, devices))}")
        return func(*args, **kwargs)

    def check(self) -> None:
        if self.violations:
            pytest.fail("tensors on an unnamed device, or devices mixed, in the library:\n"
                        + "\n".join(dict.fromkeys(self.violations)), pytrace=False)


# ----------------------------------------------------------------- the host-sync guard

HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
              "nonzero", "unique", "masked_select", "argwhere"}
SYNCING_ATEN = {"_local_scalar_dense": "a host read (.item() / int() / bool() / .tolist())",
                "lift_fresh": "a Python value copied into a tensor (host-to-device copy)",
                "nonzero": "nonzero (data-dependent shape)",
                "masked_select": "masked_select (data-dependent shape)",
                "_unique2": "unique (data-dependent shape)",
                "unique_consecutive": "unique (data-dependent shape)"}


class _SyncFunctions(TorchFunctionMode):
    def __init__(self, violations):
        super().__init__()
        self.violations = violations

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _name(func) in HOST_READS:
            where = library_caller()
            if where is not None:
                self.violations.append(f"{where}: Tensor.{_name(func)} (a host read)")
        return func(*args, **kwargs)


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, violations):
        super().__init__()
        self.violations = violations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        why = SYNCING_ATEN.get(name)
        if why is None and name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices or []):
                why = "boolean-mask indexing (nonzero: data-dependent shape)"
        if why is not None:
            where = library_caller()
            if where is not None:
                self.violations.append(f"{where}: aten.{name}: {why}")
        return func(*args, **kwargs)


class SyncGuard:
    """Records host reads, data-dependent shapes and Python values written into tensors
    by library code run inside ``with guard:`` (re-entrant, one list for all uses)."""

    def __init__(self):
        self.violations: list[str] = []
        self._stack: list[contextlib.ExitStack] = []

    def __enter__(self):
        stack = contextlib.ExitStack()
        stack.enter_context(_SyncFunctions(self.violations))
        stack.enter_context(_SyncDispatch(self.violations))
        self._stack.append(stack)
        return self

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)

    def check(self) -> None:
        if self.violations:
            pytest.fail("host syncs in the ops:\n" + "\n".join(dict.fromkeys(self.violations)),
                        pytrace=False)


OPS = ("observe", "sparse_topk", "sparse_full", "observe_start", "observe_wait")


@pytest.fixture()
def guarded_ops(monkeypatch):
    """A SyncGuard entered inside every ``microspec::`` op's body on each call.

    A mode entered around a call stops at the custom op (it is dispatched as one op), so
    the op's own implementation is wrapped: ``torch.ops.microspec.*`` from anywhere (the
    compiled graph included) then runs under the guard.
    """
    guard = SyncGuard()
    guard.calls = {}  # op name -> calls that ran under the guard
    for name in OPS:
        original = ops.IMPLEMENTATIONS[name]

        def guarded(*args, _original=original, _name=name, **kwargs):
            guard.calls[_name] = guard.calls.get(_name, 0) + 1
            with guard:
                return _original(*args, **kwargs)

        monkeypatch.setitem(ops.IMPLEMENTATIONS, name, guarded)
    return guard


# ----------------------------------------------------------------- models

VOCAB = 1024  # >= the backend's min_vocab_size, so LM heads are matched


def tiny_llama(seed=0, layers=2, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().to(device)


def prompt(device, n=12, seed=1):
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:, :6]], 1).to(device)  # a repeat: lookup finds chains


# ----------------------------------------------------------------- 1. device-correct loops

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scorer_kind", ["dense", "microspec"])
def test_eagle_loop_names_every_device(device, scorer_kind):
    from microspec_compile.heads import EagleHead
    from microspec_compile.spec import TopkScorer, TreeConfig, eagle_generate
    from microspec_compile.vocab import ActiveVocab

    target = tiny_llama(device=device)
    head = EagleHead.for_target(target).eval()
    shape = TreeConfig(depth=2, top_k=3, total_tokens=6, lookup=4)
    scorer, vocab = TopkScorer(target.lm_head, shape.top_k), None
    if scorer_kind == "microspec":
        vocab = ActiveVocab(target.lm_head.weight, 256)
        scorer = torch.compile(scorer, backend=ms.backend(vocab=vocab, inductor=False),
                               dynamic=True)
    ids = prompt(device)
    torch._dynamo.utils.counters.clear()
    eagle_generate(target, head, scorer, ids, 3, shape, vocab=vocab)  # compiles
    guard = DeviceGuard()
    with guard:
        out, stats = eagle_generate(target, head, scorer, ids, 12, shape, vocab=vocab)
        sampled, _ = eagle_generate(target, head, scorer, ids, 6, shape, vocab=vocab,
                                    sample=True, generator=torch.Generator().manual_seed(0))
    guard.check()
    assert out.shape[0] == ids.shape[1] + 12 and sampled.shape[0] == ids.shape[1] + 6
    assert len(stats.looked_up) > 0
    if vocab is not None:
        assert stats.checked > 0
        assert torch._dynamo.utils.counters["microspec"]["heads_rewritten"] >= 1


def test_eagle_head_lives_on_its_targets_device():
    """A head made for (or loaded onto) a target lives where the target's head does; the
    meta device stands in for CUDA (a CPU default device would otherwise hide it)."""
    from microspec_compile.heads import EagleHead

    target = tiny_llama().to("meta")
    head = EagleHead.for_target(target)
    assert {p.device.type for p in head.parameters()} == {"meta"}
    assert {b.device.type for b in head.buffers()} == {"meta"}


@pytest.mark.parametrize("device", DEVICES)
def test_lookup_loop_names_every_device(device):
    from microspec_compile.spec import lookup_generate

    target = tiny_llama(device=device)
    guard = DeviceGuard()
    with guard:
        lookup_generate(target, prompt(device), 10, lookup=4)
        lookup_generate(target, prompt(device), 5, lookup=4, sample=True,
                        generator=torch.Generator().manual_seed(0))
    guard.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("draft_kind", ["dense", "microspec"])
def test_chain_loop_names_every_device(device, draft_kind):
    from microspec_compile.spec import autoregressive_generate, speculative_generate

    target, draft = tiny_llama(0, device=device), tiny_llama(1, layers=1, device=device)
    vocab = None
    if draft_kind == "microspec":
        draft.compile(backend=ms.backend(capacity=256, inductor=False))
        vocab = "auto"
    ids = prompt(device)
    torch._dynamo.utils.counters.clear()
    speculative_generate(target, draft, ids, 4, gamma=3, vocab=vocab)  # compiles
    if vocab is not None:
        assert torch._dynamo.utils.counters["microspec"]["heads_rewritten"] >= 1
    guard = DeviceGuard()
    with guard:
        ref, _ = autoregressive_generate(target, ids, 10)
        out, _ = speculative_generate(target, draft, ids, 10, gamma=3, vocab=vocab)
        speculative_generate(target, draft, ids, 5, gamma=3, vocab=vocab, sample=True,
                             generator=torch.Generator().manual_seed(0))
    guard.check()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_names_every_device(device, tmp_path):
    from microspec_compile.apps.train.corpus import Sequence
    from microspec_compile.apps.train.features import compute_features
    from microspec_compile.apps.train.trainer import TrainConfig, train
    from microspec_compile.heads import EagleHead

    target = tiny_llama()  # features are computed on the CPU and cached on the host
    gen = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(0, VOCAB, (10 + i,), generator=gen), 4) for i in range(4)]
    features = compute_features(target, seqs, autocast=False)
    target.to(device)
    head = EagleHead.for_target(target)
    config = TrainConfig(lr=1e-3, warmup_steps=1, token_budget=64, autocast=False,
                         save_every_s=math.inf, rollout_weight=0.5)
    guard = DeviceGuard()
    with guard:
        report = train(head, features, tmp_path, seconds=math.inf, config=config, steps=2)
    guard.check()
    assert report["steps"] == 2 and math.isfinite(report["last_loss"])


# ----------------------------------------------------------------- 2. sync-free ops

def _weight(vocab, hidden, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(dtype)


def _token_calls(vocab, seed=0):
    """Calls that fill a 12-row vocabulary, evict, pin, repeat, are empty, are int32."""
    gen = torch.Generator().manual_seed(seed)
    calls = [(torch.arange(10), False), (torch.tensor([3, 3, 40, 41]), True)]
    calls += [(torch.randint(0, vocab, (n,), generator=gen), False) for n in (7, 1, 16, 5)]
    calls += [(torch.zeros(0, dtype=torch.int64), False),
              (torch.randint(0, vocab, (2, 9), generator=gen).to(torch.int32), False)]
    return calls


def _run_kernel_set(kernels, device, guard):
    """The observe and head kernels of one kernel set (``dispatch.KERNELS``) on a state that fills and evicts."""
    from microspec_compile.kernels import reference

    vocab, hidden, cap = 64, 16, 12
    weight = _weight(vocab, hidden).to(device)
    bias = torch.randn(vocab, generator=torch.Generator().manual_seed(2)).to(device)
    state = VocabState.empty(vocab, hidden, cap, device=device)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1)).to(device)
    if kernels == "reference":
        observe, topk, full = (reference.observe_reference, reference.sparse_topk_reference,
                               reference.sparse_full_reference)
    else:
        from microspec_compile.kernels import triton_observe as tobs
        from microspec_compile.kernels import triton_sparse_head as tsh

        observe, topk, full = tobs.observe_triton, tsh.sparse_topk_triton, tsh.sparse_full_triton
    for tokens, pin in _token_calls(vocab):
        tokens = tokens.to(device)
        with guard:
            observe(state, weight, tokens, pin)
            for normalize in ("none", "softmax", "log_softmax"):
                for b in (None, bias):
                    topk(x, state.rows, state.ids, state.count, b, 4, normalize)
                    full(x, state.rows, state.ids, state.count, b, vocab, normalize)
            topk(x, state.rows, state.ids, state.count, bias, 1, "log_softmax")  # argmax path
    return state


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_kernels_never_read_the_host(kernels):
    guard = SyncGuard()
    state = _run_kernel_set(kernels, KERNEL_DEVICE, guard)
    guard.check()
    assert int(state.count) == 12  # full: the calls evicted


def test_ops_on_the_device_path_never_read_the_host(guarded_ops):
    """The registered ops as a GPU runs them (``path="triton"``): the checks of their
    arguments included (range and empty-vocabulary checks are device-side there)."""
    dev = KERNEL_DEVICE
    vocab, hidden, cap = 64, 16, 12
    weight = _weight(vocab, hidden).to(dev)
    state = VocabState.empty(vocab, hidden, cap, device=dev)
    x = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(1)).to(dev)
    for i, (tokens, pin) in enumerate(_token_calls(vocab)):
        tokens = tokens.to(dev)
        if i % 2:
            ops.observe(state, weight, tokens, pin, path="triton")
        else:
            ops.observe_start(state, weight, tokens, pin, path="triton")
            ops.observe_wait(x, tokens, state)
        ops.sparse_topk(x, state, None, 4, "log_softmax", path="triton")
        ops.sparse_full(x, state, None, vocab, "softmax", path="triton")
    guarded_ops.check()
    assert int(state.count) == cap
    assert set(guarded_ops.calls) == set(OPS)


@pytest.mark.parametrize("kernels", ["reference", "triton", "op"])
def test_device_path_ignores_ids_out_of_range(kernels):
    """An id outside [0, V) on the device path is ignored, on the device: checking it would
    be a host read per call (host tensors on the CPU kernels still raise, off the GPU path)."""
    from microspec_compile.kernels import reference

    vocab, hidden, cap = 64, 16, 12
    weight = _weight(vocab, hidden).to(KERNEL_DEVICE)
    state = VocabState.empty(vocab, hidden, cap, device=KERNEL_DEVICE)
    tokens = torch.tensor([-1, 2, vocab, 2, 5, vocab + 7], device=KERNEL_DEVICE)
    guard = SyncGuard()
    with guard:
        if kernels == "reference":
            reference.observe_reference(state, weight, tokens)
        elif kernels == "triton":
            from microspec_compile.kernels import triton_observe as tobs

            tobs.observe_triton(state, weight, tokens)
    if kernels == "op":
        ops.observe(state, weight, tokens, path="triton")
    guard.check()
    assert sorted(state.live_ids().tolist()) == [2, 5] and int(state.step) == 1
    with pytest.raises(ValueError, match="out of range"):  # the CPU kernels, on host ids
        ops.observe(VocabState.empty(vocab, hidden, cap), weight.cpu(), tokens.cpu())


class TinyDraft(nn.Module):
    """Embedding -> MLP -> LM head -> log-softmax top-k (EAGLE-like)."""

    def __init__(self, vocab=1200, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(),
                                 nn.Linear(2 * hidden, hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.mlp(h))[:, -1, :].log_softmax(-1).topk(4)


@pytest.mark.parametrize("async_gather", [True, False])
def test_compiled_step_ops_never_read_the_host(guarded_ops, async_gather):
    """The compiled draft step (rewritten graph, device-path ops) over a few steps."""
    torch.manual_seed(0)
    model = TinyDraft().eval().to(KERNEL_DEVICE)
    compiled = torch.compile(model, backend=ms.backend(capacity=64, path="triton",
                                                       inductor=False,
                                                       async_gather=async_gather))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):  # 4 x 6 ids into 64 rows (the first call also compiles)
            compiled(torch.randint(0, 1200, (1, 6), generator=gen).to(KERNEL_DEVICE))
    guarded_ops.check()
    assert torch._dynamo.utils.counters["microspec"]["heads_rewritten"] >= 1
    observed = {"observe_start", "observe_wait"} if async_gather else {"observe"}
    assert set(guarded_ops.calls) == observed | {"sparse_topk"}  # the ops ran guarded


# ----------------------------------------------------------------- the guards catch

def test_the_guards_catch_what_they_look_for():
    """Each guard records its bugs, written as the library wrote them before (run here from
    a function compiled as if it were a library file)."""
    source = ("import torch\n"
              "def factory(like):\n"
              "    return torch.zeros(like.shape, dtype=like.dtype).masked_fill_(like > 0, 1)\n"
              "def scalar_write(t):\n"
              "    t[0] = 0\n"
              "def host_read(t):\n"
              "    return int(t.sum()) + len(t.tolist())\n"
              "def mask_index(t):\n"
              "    return t[t > 0]\n"
              "def mix(a, b):\n"
              "    return torch.cat([a, b])\n")
    space: dict = {}
    exec(compile(source, os.path.join(LIBRARY[0], "_guard_probe.py"), "exec"), space)
    t = torch.arange(4)
    device_guard = DeviceGuard()
    with device_guard:
        space["factory"](t)
        with contextlib.suppress(RuntimeError):  # torch may refuse it too, after the guard
            space["mix"](t, torch.arange(4, device="meta"))
    assert any("torch.zeros(...) without device=" in v for v in device_guard.violations)
    assert any("cat mixes ['cpu', 'meta']" in v for v in device_guard.violations)
    sync_guard = SyncGuard()
    with sync_guard:
        space["scalar_write"](t.clone())
        space["host_read"](t)
        space["mask_index"](t)
    found = "\n".join(sync_guard.violations)
    for what in ("lift_fresh", "_local_scalar_dense", "Tensor.tolist", "boolean-mask"):
        assert what in found, found


def test_verification_times_wait_for_the_device(monkeypatch):
    """On CUDA a verification's time ends when its kernels have run, not when they were
    launched (``SpecStats.target_times``); on CPU nothing is synchronised."""
    from microspec_compile.spec.stats import seconds_since

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    assert seconds_since(0.0, torch.device("cpu")) > 0 and synced == []
    assert seconds_since(0.0, torch.device("cuda", 1)) > 0
    assert synced == [torch.device("cuda", 1)]
