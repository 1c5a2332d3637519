"""EAGLE-2 tree drafting and verification on tiny Llama models (CPU, seconds)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import microspec_compile as ms
from microspec_compile.heads import EagleHead
from microspec_compile.linears.packed import PackedLinears, mkl_packing_available
from microspec_compile.spec import (
    DraftTree,
    TopkScorer,
    TreeConfig,
    accept_greedy,
    accept_sampling,
    autoregressive_generate,
    eagle_generate,
    select_tree,
)
from microspec_compile.vocab import ActiveVocab

VOCAB = 1024  # >= the backend's min_vocab_size, so the LM head is matched


def tiny_target(seed=0, bigram=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    target = LlamaForCausalLM(cfg).eval()
    if bigram:  # layers add nothing: the next token is a function of the current one
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.data.zero_()
            layer.mlp.down_proj.weight.data.zero_()
    return target


def oracle_head(target):
    """A head that predicts the bigram target exactly: hidden = embed(next token).

    The target's feature is ``norm(embed(x))``, a positive multiple of ``embed(x)``
    (unit norm weight), so the shared LM head ranks both alike.
    """
    head = EagleHead.for_target(target).eval()
    h = head.config.hidden_size
    head.fc.weight.data.zero_()
    head.fc.weight.data[:, :h] = torch.eye(h)
    head.fc.bias.data.zero_()
    head.layer.self_attn.o_proj.weight.data.zero_()
    head.layer.mlp.down_proj.weight.data.zero_()
    return head


def prompt(n=12, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# Why each case: a random head (nothing accepted: the correction path), the oracle head
# (whole paths accepted: the cache keep / re-encode path), and tree shapes from a chain
# (top_k=1) to a wide one; the head's tree alone (lookup=0), then with context lookup
# (looked-up rounds leave the head's pairs pending for a later round).
@pytest.mark.parametrize("bigram,shape", [
    (False, TreeConfig(depth=3, top_k=4, total_tokens=8, lookup=0)),
    (True, TreeConfig(depth=3, top_k=4, total_tokens=8, lookup=0)),
    (True, TreeConfig(depth=5, top_k=1, total_tokens=6, lookup=0)),
    (True, TreeConfig(depth=2, top_k=6, total_tokens=20, lookup=0)),
    (True, TreeConfig(depth=3, top_k=4, total_tokens=8, lookup=5)),
])
def test_greedy_equals_target(bigram, shape):
    target = tiny_target(bigram=bigram)
    head = oracle_head(target) if bigram else EagleHead.for_target(target).eval()
    ids = prompt()
    ref, _ = autoregressive_generate(target, ids, 24)
    out, stats = eagle_generate(target, head, TopkScorer(target.lm_head, shape.top_k), ids, 24,
                                shape)
    assert torch.equal(out, ref)
    assert max(stats.tree_sizes) <= max(shape.verified_sizes())
    if bigram:  # every round accepts a whole path of the tree
        assert stats.tokens_per_verification() > 2.0
    else:
        assert stats.tokens_per_verification() < 1.5


def test_oracle_accepts_depth_plus_one():
    target = tiny_target(bigram=True)
    shape = TreeConfig(depth=3, top_k=2, total_tokens=15, lookup=0)
    _, stats = eagle_generate(target, oracle_head(target), TopkScorer(target.lm_head, 2),
                              prompt(), 40, shape)
    # the greedy chain is the best-scored path and is always kept: depth + 1 accepted
    assert stats.accepted[:-1] == [shape.depth + 1] * (len(stats.accepted) - 1)


def test_tree_masks_and_paths():
    #        0
    #      1   2
    #     3 4   5
    tree = DraftTree(torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([-1, 0, 0, 1, 1, 2]),
                     torch.tensor([0, 1, 1, 2, 2, 2]))
    anc = tree.ancestors()
    assert anc[3].tolist() == [True, True, False, True, False, False]
    assert anc[5].tolist() == [True, False, True, False, False, True]
    mask = tree.attention_mask(past=4)
    assert mask.shape == (1, 1, 6, 10)
    assert (mask[0, 0, :, :4] == 0).all()  # everyone sees the cached prefix
    assert mask[0, 0, 4, 4 + 2] < -1e30 and mask[0, 0, 4, 4 + 1] == 0
    assert tree.position_ids(4).tolist() == [[4, 5, 5, 6, 6, 6]]
    assert sorted(tree.paths()) == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    path, bonus = accept_greedy(tree, torch.tensor([11, 14, 0, 0, 99, 0]))
    assert path == [0, 1, 4] and bonus == 99
    path, bonus = accept_greedy(tree, torch.tensor([7, 0, 0, 0, 0, 0]))
    assert path == [0] and bonus == 7


@pytest.mark.parametrize("path", [
    [0],           # nothing accepted: the prefix and the root, already in place
    [0, 1, 2],     # the best chain: in place, only cut
    [0, 2],        # a sibling: one row moves down
    [0, 2, 5, 6],  # rows move over rows that move too
])
def test_keep_path_rows_is_the_selection_of_those_rows(path):
    from transformers import DynamicCache

    from microspec_compile.spec.verify import keep_path_rows

    past, tree = 5, 7
    cache, full = DynamicCache(), []
    for layer in range(2):
        k, v = torch.randn(1, 2, past + tree, 4), torch.randn(1, 2, past + tree, 4)
        cache.update(k, v, layer)
        full.append((k.clone(), v.clone()))
    keep_path_rows(cache, past, path)
    rows = torch.tensor(list(range(past)) + [past + p for p in path])
    assert cache.get_seq_length() == past + len(path)
    for layer, (k, v) in zip(cache.layers, full):
        assert torch.equal(layer.keys, k.index_select(2, rows))
        assert torch.equal(layer.values, v.index_select(2, rows))
    # the next forward appends after the kept rows
    k_new = torch.randn(1, 2, 3, 4)
    keys, _ = cache.update(k_new, k_new, 0)
    assert torch.equal(keys, torch.cat([full[0][0].index_select(2, rows), k_new], 2))


def test_select_tree_keeps_best_and_ancestors():
    tokens = torch.tensor([5, 6, 7, 8])
    parents = torch.tensor([-1, -1, 0, 2])
    scores = torch.tensor([-0.1, -3.0, -0.5, -0.6])
    depths = torch.tensor([1, 1, 2, 3])
    tree = select_tree(1, tokens, parents, scores, depths, total_tokens=4)
    assert tree.tokens.tolist() == [1, 5, 7, 8]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    with pytest.raises(ValueError, match="total_tokens"):
        select_tree(1, tokens, parents, scores, depths, total_tokens=0)


def test_sampling_acceptance_is_distributed_as_target():
    # One root with three deterministic candidates and a sharp target distribution:
    # the emitted token (first child accepted, or the bonus) must follow p exactly.
    torch.manual_seed(0)
    v = 6
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15, 0.0])
    tree = DraftTree(torch.tensor([0, 3, 1, 5]), torch.tensor([-1, 0, 0, 0]),
                     torch.tensor([0, 1, 1, 1]))
    probs = torch.stack([p] + [torch.full((v,), 1 / v)] * 3)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(v)
    for _ in range(n):
        path, bonus = accept_sampling(tree, probs, gen)
        first = int(tree.tokens[path[1]]) if len(path) > 1 else bonus
        counts[first] += 1
    freq = counts / n
    assert counts[5] == 0  # p = 0: never emitted, although drafted
    assert torch.allclose(freq, p, atol=0.015), freq


def test_sampling_end_to_end_runs_and_stays_in_vocabulary():
    target = tiny_target(bigram=True)
    gen = torch.Generator().manual_seed(0)
    out, stats = eagle_generate(target, oracle_head(target), TopkScorer(target.lm_head, 3),
                                prompt(), 20, TreeConfig(2, 3, 8), sample=True,
                                temperature=0.05, generator=gen)  # sharp: acceptance is likely
    assert out.shape[0] == 12 + 20 and int(out.max()) < VOCAB
    assert stats.tokens_per_verification() > 1.0


def test_microspec_scorer_same_output_no_recompiles():
    torch._dynamo.reset()
    target = tiny_target(bigram=True)
    head = oracle_head(target)
    shape = TreeConfig(depth=3, top_k=4, total_tokens=10)
    vocab = ActiveVocab(target.lm_head.weight, 512)
    scorer = torch.compile(TopkScorer(target.lm_head, shape.top_k),
                           backend=ms.backend(vocab=vocab), dynamic=True)
    ids = prompt()
    ref, _ = autoregressive_generate(target, ids, 24)
    out, stats = eagle_generate(target, head, scorer, ids, 24, shape, vocab=vocab)
    assert torch.equal(out, ref)
    assert torch._dynamo.utils.counters["microspec"]["heads_rewritten"] >= 1
    assert stats.checked > 0 and stats.covered <= stats.checked
    before = dict(torch._dynamo.utils.counters["stats"])
    out2, _ = eagle_generate(target, head, scorer, prompt(seed=2), 24, shape, vocab=vocab)
    after = dict(torch._dynamo.utils.counters["stats"])
    assert after.get("unique_graphs", 0) == before.get("unique_graphs", 0)  # 1 row, then 4 rows
    assert torch.equal(out2, autoregressive_generate(target, prompt(seed=2), 24)[0])


def test_bad_inputs_raise_clearly():
    target = tiny_target()
    head = EagleHead.for_target(target)
    scorer = TopkScorer(target.lm_head, 2)
    with pytest.raises(ValueError, match="batch 1"):
        eagle_generate(target, head, scorer, torch.zeros(2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"ids in \[0, 1024\)"):
        eagle_generate(target, head, scorer, torch.tensor([[5, VOCAB]]), 4)
    with pytest.raises(TypeError, match="integer"):
        eagle_generate(target, head, scorer, torch.zeros(1, 4), 4)
    with pytest.raises(ValueError, match="top_k"):
        TreeConfig(top_k=0)
    with pytest.raises(TypeError, match="integer"):
        head.hidden(torch.zeros(1, 3), torch.zeros(1, 3, 64), torch.zeros(1, 3, dtype=torch.long))


def test_head_save_load_roundtrip(tmp_path):
    target = tiny_target()
    head = EagleHead.for_target(target)
    head.save(tmp_path, metadata={"note": "test"})
    loaded = EagleHead.load(tmp_path, target)
    for k, v in head.trainable_state().items():
        assert torch.allclose(loaded.trainable_state()[k], v.half().float(), atol=0)
    assert loaded.lm_head is target.lm_head  # shared, never copied
    other = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(ValueError, match="vocab_size"):
        EagleHead.load(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="train-eagle"):
        EagleHead.load(tmp_path / "missing", target)


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")
def test_packed_verification_same_greedy_output():
    # verify_linears runs the tree's forward through linears prepacked for its size (CPU
    # speed); it only changes rounding, so the greedy output stays the target's
    target = tiny_target(bigram=True)
    shape = TreeConfig(depth=3, top_k=4, total_tokens=10)
    ids = prompt()
    packed = PackedLinears(target, shape.total_tokens)
    assert packed.count == sum(isinstance(m, torch.nn.Linear) for m in target.modules())
    out, stats = eagle_generate(target, oracle_head(target), TopkScorer(target.lm_head, 4), ids,
                                24, shape, verify_linears=packed)
    assert torch.equal(out, autoregressive_generate(target, ids, 24)[0])
    assert stats.tokens_per_verification() > 2.0
    assert all("forward" not in m.__dict__ for m in target.modules())  # restored after use


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")
def test_packed_verification_for_another_tree_size_is_a_clear_error():
    # a packing for 4 rows would silently never be used by a 10-token tree
    target = tiny_target(bigram=True)
    shape = TreeConfig(depth=3, top_k=4, total_tokens=10, lookup=0)
    with pytest.raises(ValueError, match="packed for 4 rows but the tree verifies 10"):
        eagle_generate(target, oracle_head(target), TopkScorer(target.lm_head, 4), prompt(), 8,
                       shape, verify_linears=PackedLinears(target, 4))


def test_draft_linears_packed_once_same_output_and_checked():
    # a packing of the head passed in (the demo packs once, not per request) drafts the same
    # trees; one packed for another top_k would silently never be used
    target = tiny_target(bigram=True)
    head = oracle_head(target)
    shape = TreeConfig(depth=3, top_k=4, total_tokens=10)
    scorer = TopkScorer(target.lm_head, 4)
    out, stats = eagle_generate(target, head, scorer, prompt(), 24, shape)
    packed_out, packed_stats = eagle_generate(target, head, scorer, prompt(), 24, shape,
                                              draft_linears=ms.spec.pack_head_linears(head, shape))
    assert torch.equal(packed_out, out) and packed_stats.accepted == stats.accepted
    with pytest.raises(ValueError, match="packed for 8 rows but the tree expands 4"):
        eagle_generate(target, head, scorer, prompt(), 8, shape, draft_linears=ms.spec.
                       pack_head_linears(head, TreeConfig(depth=3, top_k=8, total_tokens=10)))


@pytest.mark.skipif(not mkl_packing_available(), reason="needs MKL's packed GEMM")
def test_drafter_packs_only_the_heads_own_linears():
    # fc + q, k, v, o + gate, up, down; the shared LM head (the scorer's) stays unpacked
    target = tiny_target()
    head = EagleHead.for_target(target).eval()
    drafter = ms.spec.EagleDrafter(head, TopkScorer(target.lm_head, 4), TreeConfig(2, 4, 6))
    assert drafter.packed.count == 8 and drafter.packed.rows == 4
    with drafter.packed:
        assert "forward" not in target.lm_head.__dict__
        assert "forward" in head.fc.__dict__


# Why: the packed dense baseline must score as the plain head does (same ids, values within
# a GEMM's rounding) for the packed row counts and for the others, and decode the same.
def test_packed_scorer_scores_as_the_plain_head():
    from microspec_compile.spec import PackedScorer

    target = tiny_target(bigram=True)
    plain = TopkScorer(target.lm_head, 4)
    packed = PackedScorer(plain, (1, 4))
    assert sorted(packed.packings) == [1, 4]
    assert all(p.count == 1 for p in packed.packings.values())  # the head's one linear
    with torch.inference_mode():
        for rows in (1, 4, 3):  # packed, packed, plain
            hidden = torch.randn(rows, 64)
            values, ids = packed(hidden)
            ref_values, ref_ids = plain(hidden)
            assert torch.equal(ids, ref_ids)
            torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    head, shape, ids = oracle_head(target), TreeConfig(depth=2, top_k=4, total_tokens=6), prompt()
    out, _ = eagle_generate(target, head, packed, ids, 16, shape)
    assert torch.equal(out, autoregressive_generate(target, ids, 16)[0])
