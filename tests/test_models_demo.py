"""Real-model tests (SmolLM2): early-exit drafts, the chain and EAGLE-2 loops and the demo.

The model (SmolLM2-135M-Instruct, fp32) is loaded once per module.  Generation
lengths are tiny to keep the file within a few minutes on a 2-core CPU.  No
timing is asserted.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from microspec_compile.apps.models import early_exit_draft, load_causal_lm  # noqa: E402
from microspec_compile.spec import (  # noqa: E402
    autoregressive_generate,
    speculative_generate,
)

pytestmark = pytest.mark.slow

from microspec_compile import backend as microspec_backend  # noqa: E402
from microspec_compile import vocab_of  # noqa: E402

NEW_TOKENS = 12
GAMMA = 4


@pytest.fixture(scope="module")
def _dynamo_once_per_module():
    limit = torch._dynamo.config.recompile_limit
    # Every compiled HF model instance shares one Dynamo cache (one forward code
    # object): the drafts and targets of this module exceed the default 8.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = limit


@pytest.fixture(autouse=True)
def fresh_dynamo(_dynamo_once_per_module):
    """Overrides conftest's per-test Dynamo reset: these tests share compiled models
    (recompiling a real model per test would take minutes), so Dynamo is reset
    once per module instead."""
    yield


@pytest.fixture(scope="module")
def smollm():
    """``(model, tokenizer, prompts, reference outputs)``; references are eager greedy.

    Runs on one thread: with two threads, multi-row fp32 GEMMs slow down 50x as
    soon as another process competes for the two cores (OpenMP barriers).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_causal_lm()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")
    from microspec_compile.apps.data import default_prompts, encode

    prompts = [encode(tokenizer, p) for p in default_prompts()]
    prompts.append(encode(tokenizer, {"text": "Name the capital of France.", "chat": True}))
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        refs = [autoregressive_generate(model, ids, NEW_TOKENS, eos_token_id=eos)[0]
                for ids in prompts]
    yield model, tokenizer, prompts, refs
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sparse_draft(smollm):
    """A 4-layer early-exit draft compiled in place with the microspec backend."""
    model, tokenizer = smollm[:2]
    draft = early_exit_draft(model, 4)
    draft.compile(backend=microspec_backend(pinned_ids=(tokenizer.eos_token_id,)), dynamic=True)
    return draft


def shares_storage(draft, target) -> bool:
    """Every parameter of ``draft`` is one of ``target``'s (compared by ``data_ptr()``)."""
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    return all(p.data_ptr() in target_ptrs for p in draft.parameters())


def test_early_exit_draft_shares_storage(smollm):
    model = smollm[0]
    draft = early_exit_draft(model, 4)
    assert type(draft) is type(model)
    assert draft.config.num_hidden_layers == 4 and len(draft.model.layers) == 4
    assert model.config.num_hidden_layers == 30  # the target is untouched
    assert shares_storage(draft, model)
    assert draft.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert draft.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert draft.model.norm.weight.data_ptr() == model.model.norm.weight.data_ptr()
    for mine, theirs in zip(draft.model.layers, model.model.layers):
        assert mine is theirs
        assert mine.self_attn.q_proj.weight.data_ptr() == theirs.self_attn.q_proj.weight.data_ptr()
    assert not any(t.is_meta for t in [*draft.parameters(), *draft.buffers()])
    with pytest.raises(ValueError):
        early_exit_draft(model, 0)


def test_early_exit_draft_is_an_early_exit(smollm):
    """Draft logits = target's final norm + head applied to hidden state after layer 4."""
    model, _, prompts, _ = smollm
    draft = early_exit_draft(model, 4)
    ids = prompts[0][:, :32]
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states[4]
        expected = model.lm_head(model.model.norm(hidden))
        got = draft(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_early_exit_draft_in_hf_generate(smollm):
    """The eager draft works with HF caches, alone and as ``assistant_model``."""
    model, tokenizer, prompts, refs = smollm
    draft = early_exit_draft(model, 4)
    ids = prompts[-1]
    with torch.inference_mode():
        out = draft.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 4)
        assisted = model.generate(ids, assistant_model=draft, max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert assisted[0].tolist() == refs[-1].tolist()


def test_speculative_loop_dense_matches_greedy(smollm):
    model, tokenizer, prompts, refs = smollm
    draft = early_exit_draft(model, 4)
    out, stats = speculative_generate(model, draft, prompts[0], NEW_TOKENS, GAMMA,
                                      eos_token_id=tokenizer.eos_token_id, vocab=None)
    assert out.tolist() == refs[0].tolist()
    assert all(0 <= a <= GAMMA for a in stats.accepted)
    assert len(stats.target_times) == len(stats.accepted) > 0
    assert stats.covered == stats.checked == 0  # a dense draft has no vocabulary


def test_microspec_draft_greedy_identical(smollm, sparse_draft):
    """Greedy speculative output with the sparse draft equals the target's own."""
    model, tokenizer, prompts, refs = smollm
    counters = torch._dynamo.utils.counters["microspec"]
    assert len(prompts) >= 5
    for ids, ref in zip(prompts, refs):
        out, stats = speculative_generate(model, sparse_draft, ids, NEW_TOKENS, GAMMA,
                                          eos_token_id=tokenizer.eos_token_id)
        assert out.tolist() == ref.tolist()
        assert stats.checked > 0 and 0 <= stats.covered <= stats.checked
        assert all(size > 0 for size in stats.vocab_sizes)
    assert counters["heads_rewritten"] > 0
    assert counters["sparse_calls"] > 0
    vocab = vocab_of(sparse_draft)
    assert 0 < vocab.size <= vocab.capacity
    # The prompt's ids entered the vocabulary through the draft's own inputs.
    assert bool(vocab.contains(prompts[-1][0]).all())


def test_microspec_draft_in_hf_assisted_generate(smollm):
    """The user path: ``generate(assistant_model=draft)`` with the in-place compiled draft.

    HF's assistant calls the draft with other inputs than our loop (three more
    graphs), so this draft skips Inductor code generation (``inductor=False``)
    to keep the test short: the graph rewrite is the same, and the Inductor
    path of the same rewrite is covered by the greedy test above.
    """
    model, tokenizer, prompts, refs = smollm
    draft = early_exit_draft(model, 4)
    draft.compile(backend=microspec_backend(pinned_ids=(tokenizer.eos_token_id,),
                                            inductor=False), dynamic=True)
    counters = torch._dynamo.utils.counters["microspec"]
    rewritten, calls = counters["heads_rewritten"], counters["sparse_calls"]
    with torch.inference_mode():
        out = model.generate(prompts[1], assistant_model=draft, do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
    assert out[0].tolist() == refs[1].tolist()
    assert counters["heads_rewritten"] > rewritten
    assert counters["sparse_calls"] > calls  # the compiled (sparse) draft really ran


def test_microspec_sampling_is_seeded_and_cold_sampling_is_greedy(smollm, sparse_draft):
    """Sampling with the sparse draft: the generator alone decides the output, and at a
    temperature near 0 the accept / residual steps reproduce the target's greedy tokens
    (a distribution test comes with the EAGLE-2 loop)."""
    model, tokenizer, prompts, refs = smollm
    ids, eos = prompts[2], tokenizer.eos_token_id

    def sampled(seed, temperature):
        gen = torch.Generator().manual_seed(seed)
        return speculative_generate(model, sparse_draft, ids, NEW_TOKENS, GAMMA, sample=True,
                                    temperature=temperature, generator=gen, eos_token_id=eos)

    out, stats = sampled(0, 0.8)
    again, _ = sampled(0, 0.8)
    assert out.tolist() == again.tolist(), "the same seed gave another output"
    assert out[: ids.shape[1]].tolist() == ids[0].tolist()
    assert out.numel() - ids.shape[1] == stats.new_tokens
    assert all(0 <= a <= GAMMA for a in stats.accepted)
    cold, _ = sampled(1, 1e-4)
    assert cold.tolist() == refs[2].tolist()


def shipped_head_and_scorer(model, eos: int, tree):
    """The shipped EAGLE head on ``model`` and its LM head compiled by microspec:
    ``(head, scorer, vocab)``."""
    from microspec_compile.apps.demo import default_head_dir
    from microspec_compile.heads import EagleHead
    from microspec_compile.spec import TopkScorer

    head = EagleHead.load(default_head_dir("smollm2"), model)
    module = TopkScorer(model.get_output_embeddings(), tree.top_k)
    vocab = vocab_of(module, pinned_ids=(eos,))
    scorer = torch.compile(module, backend=microspec_backend(pinned_ids=(eos,)), dynamic=True)
    return head, scorer, vocab


def test_shipped_eagle_head_with_microspec_is_the_targets_greedy_output(smollm):
    """The shipped EAGLE-2 head, its LM head compiled by microspec and packed verification:
    the output is the target's own greedy output, and the head drafts tokens the target
    accepts (a random head would emit about 1 token per verification)."""
    from microspec_compile.linears.packed import PackedLinears
    from microspec_compile.spec import TreeConfig, eagle_generate

    model, tokenizer, prompts, refs = smollm
    eos = tokenizer.eos_token_id
    tree = TreeConfig()
    head, scorer, vocab = shipped_head_and_scorer(model, eos, tree)
    packed = PackedLinears(model, tree.total_tokens)
    emitted = verifications = 0
    for ids, ref in zip(prompts[:3], refs[:3]):
        out, stats = eagle_generate(model, head, scorer, ids, NEW_TOKENS, tree, vocab=vocab,
                                    eos_token_id=eos, verify_linears=packed)
        assert out.tolist() == ref.tolist()
        assert all(0 < size <= vocab.capacity for size in stats.vocab_sizes)
        emitted += sum(a + 1 for a in stats.accepted)  # accepted drafts + the bonus token
        verifications += len(stats.accepted)
    assert emitted / verifications > 1.2


def test_shipped_eagle_head_with_the_int4_target_is_its_greedy_output(smollm):
    """The demo's default target: SmolLM2's exact 4-bit linears (bf16 roundings inside) with
    exact decoding attention.  EAGLE-2 + lookup with the microspec head and the lookup alone
    emit what the int4 target emits by itself, on real prompts (a fresh model: the shared
    one stays fp32)."""
    from microspec_compile.linears import TargetConfig, prepare_target
    from microspec_compile.spec import (
        TreeConfig,
        autoregressive_generate,
        eagle_generate,
        lookup_generate,
    )

    tokenizer, prompts = smollm[1], smollm[2]
    model = load_causal_lm()[0]
    assert prepare_target(model, TargetConfig("int4")).startswith("int4 (210 ")
    eos = tokenizer.eos_token_id
    tree = TreeConfig()
    head, scorer, vocab = shipped_head_and_scorer(model, eos, tree)
    for ids in prompts[:3]:
        ref, _ = autoregressive_generate(model, ids, NEW_TOKENS, eos_token_id=eos)
        out, _ = eagle_generate(model, head, scorer, ids, NEW_TOKENS, tree, vocab=vocab,
                                eos_token_id=eos)
        assert out.tolist() == ref.tolist()
        out, _ = lookup_generate(model, ids, NEW_TOKENS, tree.lookup, eos_token_id=eos)
        assert out.tolist() == ref.tolist()


def test_eagle_demo_json_has_every_field(smollm, tmp_path, capsys):
    """A tiny EAGLE-2 demo run (one prompt, a few tokens) writes every field it claims."""
    from microspec_compile.apps.demo import EAGLE_WAYS, default_head_dir, run_eagle_demo

    model, tokenizer = smollm[:2]
    out = tmp_path / "demo_results.json"
    report = run_eagle_demo(["Say hello."], max_new_tokens=6, runs=1, model=(model, tokenizer),
                            head_dir=default_head_dir("smollm2"), out=out, progress=False,
                            core=0)  # the shared model's head already has a vocabulary pinned
                                     # to EOS alone (earlier tests): the same pins, no conflict
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    for key in ("date", "hardware", "settings", "summary", "speedup_microspec_vs_dense",
                "speedup_microspec_vs_dense_packed", "speedup_microspec_vs_target",
                "identical_to_target", "warmup_s", "recompiles_during_timing",
                "microspec_counters", "outputs", "records", "chart"):
        assert key in data, key
    assert data["hardware"]["torch"] == torch.__version__ and data["hardware"].get("cpu_model")
    for key in ("tree", "max_new_tokens", "runs", "prompts", "pack_target",
                "head_held_out_agreement", "frspec_subset"):
        assert key in data["settings"], key
    for way in EAGLE_WAYS:
        row = data["summary"][way]
        assert row["tokens_per_s"] > 0 and row["speedup_vs_target"] > 0, way
        for key in ("tokens_per_target_step", "coverage", "mean_vocab_size", "draft_step_ms",
                    "target_step_ms", "prefill_ms", "draft_s", "verify_s", "rest_s"):
            assert key in row, (way, key)
        assert row["decode_tokens_per_s"] > row["tokens_per_s"] and row["prefill_ms"] > 0, way
        assert row["draft_s"] + row["verify_s"] <= row["decode_s"] + 1e-6, way  # timed within
        assert way in data["warmup_s"]
    for way in EAGLE_WAYS[1:]:
        assert data["summary"][way]["tokens_per_target_step"] >= 1.0
        assert data["summary"][way]["draft_step_ms"] > 0
        assert data["identical_to_target"][way] is True
    assert data["summary"]["microspec"]["speedup_vs_dense"] > 0
    for other in ("dense-packed", "lookup", "eagle-only"):  # lookup by default: parts alone
        assert data["summary"]["microspec"][f"speedup_vs_{other}"] > 0
    assert 0 <= data["summary"]["microspec"]["lookup_share"] <= 1
    assert data["summary"]["eagle-only"]["lookup_share"] == 0  # lookup off: no round looks up
    from microspec_compile.linears.packed import KERNELS
    for side in ("verify", "draft"):  # the kernel chosen for every weight shape, by name
        chosen = data["settings"]["packing_kernels"][side]
        assert "576x576" in chosen and set(chosen.values()) <= set(KERNELS), (side, chosen)
    assert 0 < data["summary"]["microspec"]["mean_vocab_size"] < model.config.vocab_size
    assert data["summary"]["frspec"]["mean_vocab_size"] == data["settings"]["frspec_subset"]
    assert data["microspec_counters"]["heads_rewritten"] > 0
    assert (tmp_path / "demo_results.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "tok/s" in table and "identical" in table and "decode only" in table
    calls = re.search(r"microspec head calls: (\d+) sparse", table)  # the process's counters
    assert calls and int(calls.group(1)) >= data["microspec_counters"]["heads_rewritten"] > 0
    assert data["decode_speedup_microspec_vs_dense_packed"] > 0
