"""The decoding entry point: ``spec.prepare(target, head, DecoderConfig(...)).generate(...)``.

Every head (microspec, dense through Inductor, dense prepacked, FR-Spec's subset) decodes the
target's own greedy output through one prepared decoder; the settings are checked up front.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_eagle_tree import oracle_head, prompt, tiny_target
from torch._dynamo.utils import counters

from microspec_compile import ActiveVocab
from microspec_compile.linears.packed import mkl_packing_available
from microspec_compile.spec import (
    HEADS,
    DecoderConfig,
    TreeConfig,
    autoregressive_generate,
    pack_verification,
    prepare,
)

TREE = TreeConfig(depth=2, top_k=4, total_tokens=6, lookup=4)
packing = pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")


def _config(head: str, target, **kwargs) -> DecoderConfig:
    everything = torch.arange(target.config.vocab_size)  # an FR-Spec subset that misses nothing
    return DecoderConfig(head=head, tree=TREE, capacity=256, pinned_ids=(0,),
                         frequent_ids=everything if head == "frspec" else None, **kwargs)


@packing
def test_every_head_decodes_the_targets_greedy_output():
    target = tiny_target(bigram=True)
    head = oracle_head(target)
    ids = prompt()
    expected = autoregressive_generate(target, ids, 20)[0]
    shared = pack_verification(target, TREE)  # one packing of the target for all decoders
    for name in HEADS:
        decoder = prepare(target, head, _config(name, target), verify_linears=shared)
        out, stats = decoder.generate(ids, 20)
        assert torch.equal(out, expected), name
        assert stats.tokens_per_verification() > 1.0, name
        assert (decoder.vocab is not None) == (name == "microspec")
    plain = decoder.with_tree(TreeConfig(depth=2, top_k=4, total_tokens=6, lookup=0))
    assert plain.scorer is decoder.scorer and plain.vocab is decoder.vocab
    assert torch.equal(plain.generate(ids, 20)[0], expected)


def test_microspec_decoder_fills_its_vocabulary_without_packing():
    target = tiny_target(bigram=True)
    decoder = prepare(target, oracle_head(target), _config("microspec", target, pack_target=False))
    ids = prompt()
    out, _ = decoder.generate(ids, 12)
    assert torch.equal(out, autoregressive_generate(target, ids, 12)[0])
    assert decoder.verify_linears == []
    assert decoder.vocab.contains(out[0]).all()  # prompt and emitted tokens are active
    assert decoder.vocab.pinned_ids == (0,)


def test_bad_settings_are_clear_errors():
    target = tiny_target()
    with pytest.raises(ValueError, match="head must be one of"):
        DecoderConfig(head="sparse")
    with pytest.raises(ValueError, match="frequent_ids"):
        DecoderConfig(head="frspec")
    with pytest.raises(ValueError, match="frequent_ids"):
        DecoderConfig(frequent_ids=torch.arange(10))
    decoder = prepare(target, oracle_head(target), _config("dense", target, pack_target=False))
    with pytest.raises(ValueError, match="top_k"):
        decoder.with_tree(TreeConfig(depth=2, top_k=2, total_tokens=6))


@packing
def test_a_shared_packing_must_cover_the_trees_sizes():
    target = tiny_target()
    other = pack_verification(target, TreeConfig(depth=2, top_k=4, total_tokens=8, lookup=0))
    with pytest.raises(ValueError, match=r"no packing for \[5, 6\] rows"):
        prepare(target, oracle_head(target), _config("dense", target), verify_linears=other)


def test_sixteen_decoders_in_one_process_each_stay_sparse(recwarn, caplog):
    """Issue 33: every decoder's compiled scorer shared one code object's Dynamo cache, so
    from the fourth ``prepare`` on Dynamo hit its recompile limit and ran the head dense."""
    torch._dynamo.reset()
    target = tiny_target(bigram=True)
    head, ids = oracle_head(target), prompt()
    expected = autoregressive_generate(target, ids, 12)[0]
    counters.clear()
    for i in range(16):
        tree = TreeConfig(depth=1 + i % 3, top_k=2 + i % 3, total_tokens=3 + i % 4,
                          lookup=4 * (i % 2))
        decoder = prepare(target, head, DecoderConfig(tree=tree, capacity=256,
                                                      pack_target=False))
        before = counters["microspec"]["sparse_calls"]
        out, _ = decoder.generate(ids, 12)
        assert torch.equal(out, expected), i
        assert counters["microspec"]["sparse_calls"] > before, f"decoder {i} ran dense"
    assert counters["microspec"]["dense_fallback_calls"] == 0
    assert not [w for w in recwarn if "recompile" in str(w.message)]
    assert "recompile_limit" not in caplog.text  # Dynamo logs it as a warning


def test_two_requests_take_turns_on_one_target_and_head():
    """Two decoders share the target and its head weight, each with its own vocabulary;
    their requests run a round each in turn, and each gives the target's greedy output."""
    target = tiny_target(bigram=True)
    head = oracle_head(target)
    first, second = (prepare(target, head, _config("microspec", target, pack_target=False))
                     for _ in range(2))
    assert first.vocab is not second.vocab and first.vocab.belongs_to(target.lm_head.weight)
    prompts = prompt(seed=1), prompt(seed=2)
    expected = [autoregressive_generate(target, p, 16)[0] for p in prompts]
    requests = [first.rounds(prompts[0], 16), second.rounds(prompts[1], 16)]
    results, turns = [None, None], []
    while None in results:
        for i, request in enumerate(requests):
            if results[i] is None:
                try:
                    next(request)
                    turns.append(i)
                except StopIteration as done:
                    results[i] = done.value
    assert turns[:4] == [0, 1, 0, 1]  # interleaved, a round each
    for (out, stats), want in zip(results, expected):
        assert torch.equal(out, want)
        assert stats.checked > 0
    # each vocabulary holds its own request's tokens; resetting one leaves the other
    assert first.vocab.contains(results[0][0]).all() and second.vocab.contains(results[1][0]).all()
    held = second.vocab.ids_list()
    first.vocab.reset()
    assert second.vocab.ids_list() == held and first.vocab.ids_list() == [0]


def test_a_decoder_takes_the_vocabulary_you_give_it():
    target = tiny_target(bigram=True)
    vocab = ActiveVocab(target.lm_head.weight, capacity=128, pinned_ids=0)
    decoder = prepare(target, oracle_head(target), DecoderConfig(tree=TREE, pack_target=False),
                      vocab=vocab)
    assert decoder.vocab is vocab
    ids = prompt()
    assert torch.equal(decoder.generate(ids, 12)[0], autoregressive_generate(target, ids, 12)[0])
    with pytest.raises(ValueError, match="give capacity / pinned_ids to ActiveVocab"):
        prepare(target, oracle_head(target), _config("microspec", target, pack_target=False),
                vocab=vocab)
    with pytest.raises(ValueError, match="belongs to another LM-head weight"):
        prepare(target, oracle_head(target), DecoderConfig(tree=TREE, pack_target=False),
                vocab=ActiveVocab(torch.randn_like(target.lm_head.weight)))
    with pytest.raises(ValueError, match="goes with head='microspec'"):
        prepare(target, oracle_head(target), _config("dense", target, pack_target=False),
                vocab=vocab)


def test_the_tuned_policy_scores_no_prompt_position_and_the_paper_does(monkeypatch):
    """TUNED (the default) adds the target's top-8 at verified positions and never multiplies
    the prompt's features with the whole head; PAPER does (MicroSpec's prompt signal)."""
    import microspec_compile.policy as policy

    calls = []
    real = policy.prompt_top_ids
    monkeypatch.setattr(policy, "prompt_top_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    target = tiny_target(bigram=True)
    ids = prompt()
    expected = autoregressive_generate(target, ids, 12)[0]
    for rule, scored in ((policy.TUNED, False), (policy.PAPER, True)):
        calls.clear()
        decoder = prepare(target, oracle_head(target),
                          DecoderConfig(tree=TREE, pack_target=False, policy=rule))
        assert torch.equal(decoder.generate(ids, 12)[0], expected)
        assert bool(calls) == scored, rule
    assert DecoderConfig().policy == policy.TUNED
    with pytest.raises(ValueError, match="verified_topk must be an int >= 0"):
        policy.VocabPolicy(verified_topk=-1)
    with pytest.raises(TypeError, match="VocabPolicy"):
        DecoderConfig(policy="paper")


def test_prepare_checks_the_head_and_the_tree_where_the_mistake_is_made():
    """Issue 36, point 4: a head for another target, a tree larger than its shape allows."""
    from microspec_compile.heads import EagleHead

    target = tiny_target(bigram=True)
    other = tiny_target(seed=1)  # the same shapes, another model
    with pytest.raises(ValueError, match="another model's embedding"):
        prepare(target, EagleHead.for_target(other), DecoderConfig(tree=TREE, pack_target=False))
    head = oracle_head(target)
    head.config = replace(head.config, hidden_size=head.config.hidden_size * 2)
    with pytest.raises(ValueError, match=r"hidden_size=\d+ but the target has"):
        prepare(target, head, DecoderConfig(tree=TREE, pack_target=False))
    with pytest.raises(ValueError, match=r"total_tokens=100 is more than .* \(21: the root"):
        TreeConfig(depth=1, top_k=4, total_tokens=100)
    assert TreeConfig(depth=1, top_k=4, total_tokens=21).max_tokens() == 21
    assert DecoderConfig(pinned_ids=2).pinned_ids == (2,)  # one id needs no list
    with pytest.raises(ValueError, match="capacity must be an int >= 1, got -5"):
        DecoderConfig(capacity=-5)  # said where it is given, not at prepare


def test_a_scorer_that_runs_uncompiled_is_said(recwarn):
    """Dynamo may run a shared scorer uncompiled (its recompile limit): not silently."""
    from microspec_compile.spec.scorers import VocabScorer, warn_ran_eagerly

    warn_ran_eagerly.cache_clear()
    target = tiny_target()
    lm_head = target.lm_head
    vocab = ActiveVocab(lm_head.weight, 64)
    plain = VocabScorer(lambda h, w, b: torch.nn.functional.linear(h, w, b).topk(2), lm_head, vocab)
    before = counters["microspec"]["scorer_eager_calls"]
    with pytest.warns(UserWarning, match="ran without the microspec backend"):
        plain(torch.randn(1, lm_head.in_features))
    assert counters["microspec"]["scorer_eager_calls"] == before + 1
