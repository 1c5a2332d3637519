"""The asynchronous gather in the compiled graph: ``observe_start`` / ``observe_wait``.

On CPU the start op is the synchronous observe and the wait does nothing, so these
tests check what does not need a GPU: where the backend puts the two ops, that the
outputs and the state equal the synchronous path bit for bit, that Inductor keeps
the ops in place (no copy of the state) and treats the state as static CUDA-graph
inputs, the config switch, opcheck, the counters and the capture fallback warning.
Tests with a ``device`` parameter make the same assertions on CPU and CUDA; their
``cuda`` cases run on a GPU only (``bench/gpu_check.sh``) and add CUDA's own checks.
"""
from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn as nn
from tiny_models import H, TinyDraft, V
from torch._dynamo.utils import counters

import microspec_compile as mc
from microspec_compile.kernels import async_gather, ops
from microspec_compile.kernels.state import VocabState

CAP = 256
OPS = torch.ops.microspec
backend_module = importlib.import_module("microspec_compile.backend")  # the package exports
# a function of the same name
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


class LlamaLogits(nn.Module):
    """A HF Llama returning its full-vocabulary logits (the ``sparse_full`` rewrite)."""

    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def forward(self, ids):
        return self.model(ids, use_cache=False).logits


MODELS = {"tiny": TinyDraft, "llama": LlamaLogits}


def compile_capturing(model, **config):
    """``torch.compile`` with the microspec backend; returns (compiled, rewritten graph modules)."""
    inner, graphs = mc.backend(capacity=CAP, **config), []

    def capture(gm, example_inputs, **kwargs):
        run = inner(gm, example_inputs, **kwargs)
        graphs.append(run)
        return run

    mode = config.pop("mode", None)  # torch.compile passes it to the backend
    return torch.compile(model, backend=capture, mode=mode), graphs


def node_index(graph, predicate):
    return [i for i, n in enumerate(graph.nodes) if predicate(n)]


def call_to(target):
    return lambda n: n.op == "call_function" and n.target == target


def step_inputs(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (1, 6), generator=gen) for _ in range(n)]


# ----------------------------------------------------------------- graph structure

# tiny: the minimal draft (one embedding, one MLP, top-k head: sparse_topk);
# llama: a HF decoder (two real decoder layers, logits returned: sparse_full, and the
#        embedding reached through HF's module structure).
@pytest.mark.parametrize("name", list(MODELS))
def test_wait_sits_after_the_layers_immediately_before_the_head(name):
    torch.manual_seed(0)
    compiled, graphs = compile_capturing(MODELS[name](), inductor=False, async_gather=True)
    counters.clear()
    with torch.no_grad():
        compiled(step_inputs(1)[0])
    (run,) = graphs
    graph = run.rewritten.graph
    nodes = list(graph.nodes)
    starts = node_index(graph, call_to(OPS.observe_start.default))
    waits = node_index(graph, call_to(OPS.observe_wait.default))
    heads = node_index(graph, lambda n: n.op == "call_function" and n.target in (
        OPS.sparse_topk.default, OPS.sparse_full.default))
    embeds = node_index(graph, lambda n: "embedding" in str(n.target))
    layers = node_index(graph, lambda n: n.op == "call_function" and n.target is torch._C._nn.linear)
    assert len(starts) == len(waits) == len(heads) == 1
    assert not node_index(graph, call_to(OPS.observe.default)), "the synchronous observe remains"
    assert layers, "the draft's layers should still be Linears in the Dynamo graph"
    assert starts[0] < min(embeds), "the gather must start before the embedding"
    assert waits[0] == heads[0] - 1, "the wait must come immediately before the head"
    assert waits[0] > max(layers), "the wait must come after the decoder layers"
    wait, head = nodes[waits[0]], nodes[heads[0]]
    assert wait.args[0] is head.args[0], "the wait reads the head's own hidden states"
    assert wait.args[1] is nodes[starts[0]].args[7], "the wait reads the gathered ids"
    assert counters["microspec"]["observe_start_inserted"] == 1
    assert counters["microspec"]["observe_wait_inserted"] == 1
    assert counters["microspec"]["observe_inserted"] == 1


@pytest.mark.parametrize("config", [{}, {"async_gather": False}])
def test_the_default_and_the_switch_off_are_the_synchronous_observe(config):
    compiled, graphs = compile_capturing(TinyDraft(tied=False), inductor=False, **config)
    counters.clear()
    with torch.no_grad():
        compiled(step_inputs(1)[0])
    graph = graphs[0].rewritten.graph
    assert len(node_index(graph, call_to(OPS.observe.default))) == 1
    assert not node_index(graph, call_to(OPS.observe_start.default))
    assert not node_index(graph, call_to(OPS.observe_wait.default))
    assert counters["microspec"]["observe_inserted"] == 1
    assert counters["microspec"]["observe_start_inserted"] == 0
    assert counters["microspec"]["observe_wait_inserted"] == 0


# ----------------------------------------------------------------- same numbers

# auto: the device's kernels behind opaque head ops; inductor: the head decomposed into
# an mm over the rows (ordered after the wait only through its declared mutation);
# reduce-overhead: CUDA graphs (Inductor skips them on CPU, and says so in its counter).
# The same assertions on both devices; CUDA adds its own: no host sync in the steps after
# warm-up (set_sync_debug_mode; on CPU: tests/test_device_guards.py) and no CUDA graph
# skipped. Counters are process-wide: cleared here, before this test compiles.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,mode", [("auto", None), ("inductor", None),
                                       ("auto", "reduce-overhead")])
def test_async_outputs_equal_the_synchronous_path_bit_for_bit(device, path, mode):
    torch.manual_seed(0)
    model = TinyDraft(tied=False).to(device).eval()
    twin = copy.deepcopy(model)  # its own head weight, so its own vocabulary
    extra = {} if mode is None else {"mode": mode}
    counters.clear()
    fast, graphs = compile_capturing(model, path=path, async_gather=True, **extra)
    slow, _ = compile_capturing(twin, path=path, async_gather=False, **extra)
    inputs = [ids.to(device) for ids in step_inputs(6)]

    def both(ids):
        torch.compiler.cudagraph_mark_step_begin()
        got = fast(ids)  # a CUDA-graph output is overwritten by the next replay: cloned
        got = got.values.clone(), got.indices.clone()
        want = slow(ids)
        return got, (want.values.clone(), want.indices.clone())

    with torch.no_grad():
        outs = [both(ids) for ids in inputs[:3]]  # compile, warm up, record the CUDA graph
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            outs += [both(ids) for ids in inputs[3:]]
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    for (got_values, got_ids), (want_values, want_ids) in outs:
        assert torch.equal(got_values, want_values) and torch.equal(got_ids, want_ids)
    for a, b in zip(mc.vocab_of(model).state(), mc.vocab_of(twin).state()):
        assert torch.equal(a, b)
    skips = counters["inductor"]["cudagraph_skips"]
    if mode is not None:  # CPU: skipped (no CUDA graphs there), so the counter counts
        assert (skips == 0) if device == "cuda" else (skips > 0)


def test_state_placeholders_are_static_cuda_graph_inputs(capfd):
    """AOTAutograd must list the state among the static inputs, else CUDA graphs copy
    it before every replay and refuse its mutation (``skipping cudagraphs due to
    mutated inputs``). Read from its own log: there is no public query."""
    torch._logging.set_logs(cudagraph_static_inputs=True)
    try:
        compiled, graphs = compile_capturing(TinyDraft(tied=False).eval(), mode="reduce-overhead",
                                             async_gather=True)
        with torch.no_grad():
            compiled(step_inputs(1)[0])
    finally:
        torch._logging.set_logs()
    log = capfd.readouterr().err
    placeholders = [n for n in graphs[0].rewritten.graph.nodes if n.op == "placeholder"]
    for pos in range(len(placeholders) - len(VocabState._fields), len(placeholders)):
        assert f"Adding static input pos {pos} for source None" in log
    assert "Non-static input pos 1 for source L['ids']" in log  # the check can fail


def test_inductor_keeps_both_ops_in_place():
    """Reinplacing must hold: a copy of the [CAP + 1, H] buffer per step would cost more
    than the sparse head itself (and would break the asynchronous update)."""
    from torch._inductor.utils import run_and_get_code

    compiled, _ = compile_capturing(TinyDraft(tied=False).eval(), async_gather=True)
    with torch.no_grad():
        _, (code,) = run_and_get_code(compiled, step_inputs(1)[0])
    calls = [line for line in code.splitlines() if "torch.ops.microspec.observe" in line]
    assert len(calls) == 2 and "observe_start" in calls[0] and "observe_wait" in calls[1]
    body = code.split("def call")[1].split("def get_args")[0]
    allocations = [line for line in body.splitlines() if "empty_strided" in line]
    assert allocations, "the check must see the graph's allocations"
    assert not [line for line in allocations if f"({CAP + 1}, {H})" in line], \
        "Inductor allocated a copy of the state's rows"
    assert "copy_" not in body


# ----------------------------------------------------------------- config, ops, fallback

# Each invalid value names its setting; options= is torch.compile's other backend argument.
@pytest.mark.parametrize("config,match", [({"async_gather": "yes"}, "async_gather"),
                                          ({"mode": "fast"}, "mode must be one of"),
                                          ({"mode": "reduce-overhead", "inductor": False},
                                           "needs inductor")])
def test_config_is_validated(config, match):
    with pytest.raises(ValueError, match=match):
        mc.MicrospecConfig(**config)


def test_torch_compile_options_are_refused():
    compiled = torch.compile(TinyDraft(tied=False), backend="microspec", options={"max_autotune": True})
    with pytest.raises(ValueError, match="options"):
        compiled(step_inputs(1)[0])


# torch on CPU: the CPU kernels; triton: the Triton kernels, natively on a GPU (there
# on the side stream) or through the interpreter on CPU tensors (conftest.py).
@pytest.mark.parametrize("path,device", [("torch", "cpu"), ("triton", TRITON_DEVICE)])
def test_opcheck(path, device):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(111, 16, generator=gen).to(device)
    state = VocabState.empty(111, 16, 24, device=device)
    tokens = torch.tensor([[1, 2], [2, 90]], device=device)
    torch.library.opcheck(OPS.observe_start.default, (*state, weight, tokens, False, path))
    torch.library.opcheck(OPS.observe_wait.default,
                          (torch.randn(3, 16, generator=gen).to(device), tokens, state.rows,
                           state.ids, state.count))


def test_cpu_start_is_the_synchronous_observe_and_wait_a_no_op():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(111, 16, generator=gen)
    state, reference = VocabState.empty(111, 16, 4), VocabState.empty(111, 16, 4)
    for tokens in ([5, 9, 5], [1, 2, 3], [9, 60, 61, 62]):  # the last one evicts
        tokens = torch.tensor(tokens)
        ops.observe_start(state, weight, tokens)
        ops.observe(reference, weight, tokens)
        before = state.clone()
        ops.observe_wait(torch.randn(2, 16), tokens, state)
        for got, unchanged, want in zip(state, before, reference):
            assert torch.equal(got, unchanged) and torch.equal(got, want)


def test_capture_failure_falls_back_with_one_warning(monkeypatch):
    """A failed capture probe (faked here: CPU has no CUDA graphs) gives the synchronous
    observe in every CUDA-graph compile, and exactly one warning naming the failure."""
    calls = []

    def failing_probe(device, path="auto"):
        calls.append(device)
        return "RuntimeError: operation not permitted when stream is capturing (test)"

    monkeypatch.setattr(backend_module, "capture_problem", failing_probe)
    backend_module.warn_capture_fallback.cache_clear()
    counters.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):  # two models, two graphs: one warning
            compiled, graphs = compile_capturing(TinyDraft(tied=False).eval(), inductor=False,
                                                 async_gather=True)
            compiled_cg, graphs_cg = compile_capturing(TinyDraft(tied=False).eval(),
                                                       mode="reduce-overhead", async_gather=True)
            with torch.no_grad():
                compiled(step_inputs(1)[0])
                compiled_cg(step_inputs(1)[0])
            graph = graphs_cg[0].rewritten.graph
            assert len(node_index(graph, call_to(OPS.observe.default))) == 1
            assert not node_index(graph, call_to(OPS.observe_wait.default))
            assert node_index(graphs[0].rewritten.graph, call_to(OPS.observe_wait.default)), \
                "without CUDA graphs the probe must not matter"
    ours = [w for w in record if "could not be captured" in str(w.message)]
    assert len(ours) == 1 and "stream is capturing (test)" in str(ours[0].message)
    assert len(calls) == 2, "the probe runs for CUDA-graph compiles only"
    assert counters["microspec"]["async_gather_capture_fallbacks"] == 2


def test_capture_probe_is_none_off_cuda():
    assert async_gather.capture_problem(torch.device("cpu")) is None


# ----------------------------------------------------------------- both devices

@pytest.mark.parametrize("device", DEVICES)
def test_async_start_wait_equals_synchronous_observe(device):
    """The gather (Triton kernels; on CUDA on the side stream) against the synchronous
    observe (the torch kernels) through evictions: the same state after every step and
    the same head output, ids included (eviction does not depend on rows or timing)."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=gen).to(dev)
    fast, slow = VocabState.empty(V, H, 16, device=dev), VocabState.empty(V, H, 16, device=dev)
    x = torch.randn(3, H, generator=gen).to(dev)
    for ids in step_inputs(6):  # 36 ids into 16 rows
        ids = ids.to(dev)
        ops.observe_start(fast, weight, ids, path="triton")
        ops.observe_wait(x, ids, fast)
        ops.observe(slow, weight, ids, path="torch")
        for name, a, b in zip(VocabState._fields, fast, slow):
            scratch = name in ("rows", "ids", "member", "last_seen")  # the last row / entry
            assert torch.equal(a[:-1], b[:-1]) if scratch else torch.equal(a, b), name
        got = ops.sparse_topk(x, fast, None, 4, "log_softmax")
        want = ops.sparse_topk(x, slow, None, 4, "log_softmax")
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0])
    assert fast.size == 16
    assert async_gather.capture_problem(dev) is None  # None off CUDA: no graphs to capture
