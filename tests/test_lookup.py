"""Context lookup (prompt lookup decoding), alone and inside the EAGLE-2 loop, on tiny models."""
import pytest
import torch
from test_eagle_tree import VOCAB, oracle_head, prompt, tiny_target

from microspec_compile.linears.packed import PackedLinears, mkl_packing_available
from microspec_compile.spec import (
    ContextLookup,
    TopkScorer,
    TreeConfig,
    autoregressive_generate,
    eagle_generate,
    lookup_generate,
)
from microspec_compile.spec.lookup import chain_tree


def test_propose_takes_the_longest_suffix_and_its_latest_occurrence():
    index = ContextLookup([1, 2, 3, 9, 2, 3, 8, 5, 2, 3])
    # (2, 3) occurred twice before the end: the latest is followed by 8, 5
    assert index.propose(3) == [8, 5, 2]
    index = ContextLookup([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3])
    # the 3-gram (1, 2, 3) is tried before the more recent 2-gram (2, 3): followed by 4, 9
    assert index.propose(2) == [4, 9]
    assert ContextLookup([1, 2, 3, 4]).propose(4) == []   # nothing recurs
    assert ContextLookup([5, 4, 5]).propose(4) == []      # a 1-gram is below min_ngram
    assert ContextLookup([5, 4, 5], min_ngram=1).propose(2) == [4, 5]


def test_a_loop_is_continued_past_the_end_of_the_context():
    # the match ends right before the suffix: the copy goes on with its own tokens
    assert ContextLookup([9, 1, 2, 1, 2]).propose(5) == [1, 2, 1, 2, 1]
    assert ContextLookup([4, 4, 4]).propose(3) == [4, 4, 4]


def test_extend_one_by_one_equals_building_at_once():
    ids = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    grown = ContextLookup(ids[:3])
    for k in range(3, len(ids)):
        grown.extend([ids[k]])
        assert grown.propose(6) == ContextLookup(ids[:k + 1]).propose(6)


def test_chain_tree_is_one_path():
    tree = chain_tree(7, [3, 4])
    assert tree.tokens.tolist() == [7, 3, 4] and tree.parents.tolist() == [-1, 0, 1]
    assert tree.paths() == [[0, 1, 2]]


@pytest.mark.parametrize("bigram", [
    False,  # a random target: chains are mostly rejected (the bonus path)
    True,   # a bigram target loops: whole chains are accepted (the cache keep path)
])
def test_lookup_alone_is_the_targets_greedy_output(bigram):
    target = tiny_target(bigram=bigram)
    ids = prompt()
    ref, _ = autoregressive_generate(target, ids, 30)
    out, stats = lookup_generate(target, ids, 30, lookup=4)
    assert torch.equal(out, ref)
    assert max(stats.tree_sizes) <= 5
    if bigram:
        assert stats.tokens_per_verification() > 2.0


def test_lookup_sampling_runs_seeded_and_stays_in_vocabulary():
    target = tiny_target(bigram=True)
    runs = [lookup_generate(target, prompt(), 20, lookup=4, sample=True, temperature=0.7,
                            generator=torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < VOCAB


def test_eagle_with_lookup_skips_the_head_in_looked_up_rounds():
    # the oracle head and a looping target: lookup rounds verify chains (lookup + 1 nodes),
    # the other rounds the head's tree; the output stays the target's, and the head's pairs
    # from looked-up rounds are encoded later (a wrong pairing would change its drafts, not
    # the output, so the head's acceptance is checked too)
    target = tiny_target(bigram=True)
    head = oracle_head(target)
    ids = prompt()
    shape = TreeConfig(depth=2, top_k=2, total_tokens=4, lookup=6)
    ref, _ = autoregressive_generate(target, ids, 40)
    out, stats = eagle_generate(target, head, TopkScorer(target.lm_head, 2), ids, 40, shape)
    assert torch.equal(out, ref)
    assert 7 in stats.tree_sizes and 4 in stats.tree_sizes
    head_rounds = [a for a, size in zip(stats.accepted, stats.tree_sizes) if size == 4]
    assert all(a == shape.depth + 1 for a in head_rounds[:-1])  # the oracle's chain, always


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL packing")
def test_packings_for_both_sizes_are_used_and_checked():
    target = tiny_target(bigram=True)
    head = oracle_head(target)
    shape = TreeConfig(depth=2, top_k=2, total_tokens=4, lookup=6)
    assert shape.verified_sizes() == (4, 7)
    packs = [PackedLinears(target, rows) for rows in shape.verified_sizes()]
    ids = prompt()
    out, _ = eagle_generate(target, head, TopkScorer(target.lm_head, 2), ids, 24, shape,
                            verify_linears=packs)
    assert torch.equal(out, autoregressive_generate(target, ids, 24)[0])
    with pytest.raises(ValueError, match="packed for 5 rows but the tree verifies 4 or 7"):
        eagle_generate(target, head, TopkScorer(target.lm_head, 2), ids, 8, shape,
                       verify_linears=[packs[0], PackedLinears(target, 5)])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="lookup must be >= 0"):
        TreeConfig(lookup=-1)
    with pytest.raises(ValueError, match="min_ngram"):
        ContextLookup([1, 2], min_ngram=3, max_ngram=2)
    target = tiny_target()
    with pytest.raises(ValueError, match="lookup must be >= 1"):
        lookup_generate(target, prompt(), 4, lookup=0)
    with pytest.raises(ValueError, match="batch 1"):
        lookup_generate(target, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="integer"):
        lookup_generate(target, torch.zeros(1, 3), 4)
    with pytest.raises(ValueError, match=r"ids in \[0, 1024\)"):
        lookup_generate(target, torch.tensor([[3, VOCAB]]), 4)
