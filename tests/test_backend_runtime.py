"""The backend at run time: observation, recompiles, fallback, errors, HF generate."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn as nn
from tiny_models import H, TinyDraft, V
from torch._dynamo.utils import counters

import microspec_compile as mc


def test_entry_point_registers_backend():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "microspec" in names
    assert "microspec" in torch._dynamo.list_backends()


def test_inputs_are_observed_in_graph_with_zero_recompiles():
    torch.manual_seed(0)
    model = TinyDraft().eval()
    compiled = torch.compile(model, backend="microspec")  # default config, by name
    counters.clear()
    seen = set()
    with torch.no_grad():
        for _ in range(50):
            ids = torch.randint(0, V, (2, 6))
            seen |= set(ids.flatten().tolist())
            _, top = compiled(ids)
            assert set(top.flatten().tolist()) <= seen  # drafts come from the context
    vocab = mc.vocab_of(compiled)
    assert set(vocab.ids_list()) == seen  # capacity 4096 > V: nothing evicted
    assert counters["microspec"]["observe_inserted"] == 1
    assert counters["microspec"]["sparse_calls"] == 50
    assert counters["stats"]["unique_graphs"] == 1, "the changing vocabulary caused recompiles"


def test_lone_head_with_changing_row_counts():
    """EAGLE passes the head module around and calls it with 1, then 10, 60 rows."""
    head = nn.Linear(H, V, bias=False)
    vocab = mc.ActiveVocab(head.weight, 256, pinned_ids=[0])
    compiled = torch.compile(head, backend=mc.backend(vocab=vocab))
    vocab.observe(torch.arange(100, 300))
    with torch.no_grad():
        for rows in (1, 10, 60, 10, 1):
            out = compiled(torch.randn(rows, H))
            assert out.shape == (rows, V)  # full-vocabulary output kept
            assert torch.isfinite(out).sum(-1).eq(201).all()  # 200 observed + pinned
    assert vocab.capacity == 256 and vocab.size == 201


def test_model_without_head_falls_back_with_one_warning():
    mlp = nn.Sequential(nn.Linear(H, 64), nn.ReLU(), nn.Linear(64, H))
    compiled = torch.compile(mlp, backend="microspec")
    counters.clear()
    x = torch.randn(3, H)
    with pytest.warns(UserWarning, match="no LM head found") as record:
        out = compiled(x)
    assert len([w for w in record if "no LM head" in str(w.message)]) == 1
    torch.testing.assert_close(out, mlp(x))
    assert counters["microspec"]["fallback_no_head"] == 1


def test_head_alone_usable_from_first_call_dense_while_empty():
    # A head compiled on its own has no embedding to observe: before any id is observed
    # it scores the full vocabulary (exact, one warning), then the sparse path takes over.
    from microspec_compile.backend import warn_empty_vocabulary

    warn_empty_vocabulary.cache_clear()
    head = nn.Linear(H, V, bias=False)
    compiled = torch.compile(head, backend="microspec")
    x = torch.randn(2, H)
    with pytest.warns(UserWarning, match="active vocabulary is empty") as record:
        out = compiled(x)
    assert len([w for w in record if "vocabulary is empty" in str(w.message)]) == 1
    torch.testing.assert_close(out, head(x))  # dense: no -inf anywhere
    assert counters["microspec"]["dense_fallback_calls"] == 1
    vocab = mc.vocab_of(compiled)
    vocab.observe(torch.tensor([3, 7]))
    sparse = compiled(x)
    assert counters["microspec"]["sparse_calls"] == 1
    assert torch.isfinite(sparse[:, [3, 7]]).all() and torch.isinf(sparse).sum() == 2 * (V - 2)


def test_empty_vocabulary_op_is_an_error_not_nan():
    head = nn.Linear(H, V, bias=False)
    vocab = mc.ActiveVocab(head.weight, 64)
    with pytest.raises(ValueError, match="active vocabulary is empty"):
        torch.ops.microspec.sparse_full(torch.randn(2, H), vocab.rows, vocab.ids, vocab.count,
                                        None, V, "none")


def test_vocab_of_before_first_call_observes_into_the_backend_vocabulary():
    head = nn.Linear(H, V, bias=False)
    vocab = mc.vocab_of(head, capacity=64)  # before compiling: created with the backend's size
    vocab.observe(torch.tensor([1, 2, 3]))
    compiled = torch.compile(head, backend=mc.backend(capacity=64))
    out = compiled(torch.randn(1, H))
    assert mc.vocab_of(compiled) is vocab and torch.isfinite(out).sum() == 3
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="capacity=64.*capacity=128"):  # not wrapped by Dynamo
        torch.compile(head, backend=mc.backend(capacity=128))(torch.randn(1, H))


def test_bad_config_and_hidden_dtype():
    with pytest.raises(ValueError, match="capacity"):
        mc.backend(capacity=0)
    with pytest.raises(ValueError, match="path"):
        mc.backend(path="cuda-magic")
    head = nn.Linear(H, V, bias=False)
    vocab = mc.ActiveVocab(head.weight, 64, [1])
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.microspec.sparse_full(torch.randn(2, H, dtype=torch.float64), vocab.rows,
                                        vocab.ids, vocab.count, None, V, "none")
    with pytest.raises(ValueError, match="hidden must be"):
        torch.ops.microspec.sparse_topk(torch.randn(2, H + 1), vocab.rows, vocab.ids,
                                        vocab.count, None, 3, "none")


def test_vocab_of_a_module_without_head_is_a_clear_error():
    with pytest.raises(LookupError, match="cannot tell which weight.*ActiveVocab"):
        mc.vocab_of(nn.Linear(4, 4))


def _tiny_llama(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.mark.hf_inductor_cpu
def test_hf_assisted_generation_is_exact_and_really_sparse():
    target, draft = _tiny_llama(2, seed=0), _tiny_llama(1, seed=1)
    # Compile in place: generate() reached through torch.compile's OptimizedModule
    # would run the uncompiled module.
    draft.compile(backend=mc.backend(pinned_ids=[0]))
    prompt = torch.randint(1, V, (1, 10))
    counters.clear()
    with torch.no_grad():
        expected = target.generate(prompt, max_new_tokens=16, do_sample=False)
        got = target.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=draft)
    assert torch.equal(got, expected)
    assert counters["microspec"]["heads_rewritten"] >= 1
    assert counters["microspec"]["sparse_calls"] >= 4, "the draft never ran the sparse head"
    vocab = mc.vocab_of(draft)
    assert set(prompt.flatten().tolist()) <= set(vocab.ids_list())
    assert vocab.size < V


def test_target_observer_adds_top3_and_keeps_outputs_identical():
    target, draft = _tiny_llama(2, seed=0), _tiny_llama(1, seed=1)
    plain = _tiny_llama(2, seed=0)  # the same weights, compiled with plain Inductor
    plain.compile(backend="inductor")
    ids = torch.randint(1, V, (1, 7))
    with torch.no_grad():
        expected = plain(ids).logits
    target.compile(backend=mc.observer(draft, k=3, capacity=512))
    counters.clear()
    with torch.no_grad():
        got = target(ids).logits
    assert torch.equal(got, expected), "the observer changed the target's outputs"
    assert counters["microspec"]["target_topk_inserted"] == 1
    vocab = mc.vocab_of(draft)
    top3 = set(expected.topk(3, dim=-1).indices.flatten().tolist())
    assert set(vocab.ids_list()) == top3
    assert vocab.capacity == 512


@pytest.mark.parametrize("path", ["torch", "inductor"])  # the two kernel paths a CPU runs
def test_kernel_paths_agree(path):
    torch.manual_seed(0)
    model = TinyDraft().eval()
    compiled = torch.compile(model, backend=mc.backend(path=path, capacity=256))
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        values, top = compiled(ids)
        logits = model.lm_head(model.embed(ids) + model.mlp(model.embed(ids)))[:, -1, :]
    mask = torch.full((V,), float("-inf"))
    mask[ids.flatten()] = 0
    ref_values, ref_top = (logits + mask).log_softmax(-1).topk(4)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(top, ref_top)


def test_inductor_path_fuses_and_is_dense_while_empty():
    from torch._inductor.utils import run_and_get_code

    head = nn.Linear(H, V, bias=False)
    vocab = mc.ActiveVocab(head.weight, 64)
    compiled = torch.compile(head, backend=mc.backend(path="inductor", vocab=vocab))
    x = torch.randn(2, H)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), head(x))  # empty: the dense graph
    vocab.observe(torch.arange(10))
    torch._dynamo.reset()
    with torch.no_grad():
        out, (code,) = run_and_get_code(compiled, torch.randn(2, H))
    assert "torch.ops.microspec.sparse_full" not in code  # decomposed: mm + fused epilogue
    assert "extern_kernels.mm(" in code
    assert torch.isfinite(out).sum(-1).eq(10).all()


def test_existing_vocabulary_with_other_settings_is_a_clear_error():
    """vocab_of(capacity=512) then backend(capacity=4096) on the same head: no silent 512."""
    head = nn.Linear(H, V, bias=False)
    vocab = mc.vocab_of(head, capacity=512, pinned_ids=[7])  # the default vocabulary of head
    compiled = torch.compile(head, backend=mc.backend(capacity=4096))
    with torch.no_grad(), pytest.raises(ValueError, match="capacity=512.*capacity=4096.*Active"):
        compiled(torch.randn(2, H))
    with pytest.raises(ValueError, match=r"pinned_ids=\[7\].*pinned_ids=\[8\]"):
        mc.vocab_of(head, pinned_ids=[8])
    assert mc.vocab_of(head, capacity=512, pinned_ids=7) is vocab  # the same settings: fine
    assert mc.vocab_of(head) is vocab  # none given: whatever it has


@pytest.mark.parametrize("name", ["head", "observe_inputs", "path", "capacityy"])
def test_observer_refuses_settings_it_does_not_use(name):
    with pytest.raises(TypeError, match=repr(name)):
        mc.observer(nn.Linear(H, V, bias=False), **{name: None})


# Why: Inductor's generated code calls our ops by argument name and its on-disk caches do not
# key on custom ops' schemas; renaming an argument (impl -> path, 2026-12-05) made a graph
# cached by the older package fail with "Unknown keyword argument". The backend compiles
# under a cache key tag holding the schemas' digest (the user's own tag kept in front).
@pytest.mark.parametrize("path", ["torch", "inductor"])
def test_inductor_caches_key_on_the_ops_schemas(path, monkeypatch):
    import hashlib

    import torch._inductor.compile_fx as compile_fx_module

    from microspec_compile.kernels import ops

    tags = []

    def record(gm, example_inputs, *args, **kwargs):
        tags.append(torch.compiler.config.cache_key_tag)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", record)
    torch._dynamo.reset()
    model = TinyDraft().eval()
    compiled = torch.compile(model, backend=mc.backend(path=path, capacity=256))
    with torch.no_grad(), torch.compiler.config.patch(cache_key_tag="user-tag-"):
        compiled(torch.randint(0, V, (1, 5)))
    schemas = "\n".join(str(getattr(torch.ops.microspec, n).default._schema) for n in ops.OPS)
    digest = hashlib.sha256(schemas.encode()).hexdigest()[:16]
    assert tags and all(tag == f"user-tag-microspec-ops-{digest}" for tag in tags), tags
    renamed = schemas.replace('str path="auto"', 'str impl="auto"')
    assert renamed != schemas
    assert hashlib.sha256(renamed.encode()).hexdigest()[:16] != digest
