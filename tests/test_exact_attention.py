"""Exact decoding attention (``spec.attention.decoding_session``): a verification's rows are
the one-token steps' rows, bit for bit, for a target that rounds activations to bf16."""
import torch
from test_eagle_tree import tiny_target
from test_int4_linear import needs_int4, q4_1_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from microspec_compile.hf import cache_kwargs
from microspec_compile.linears.int4 import quantize_exact_int4
from microspec_compile.spec.attention import decoding_session
from microspec_compile.spec.cache import DecodingCache
from microspec_compile.spec.tree import DraftTree, causal_mask
from microspec_compile.spec.verify import (
    crop_cache,
    keep_path_rows,
    prefill,
    target_forward,
    target_session,
    verify_tree,
)

# siblings (masked gaps between a node's keys), a chain under a sibling, depths 0-3
TREE = DraftTree(torch.tensor([5, 7, 9, 11, 13, 17, 19]), torch.tensor([-1, 0, 0, 0, 1, 3, 5]),
                 torch.tensor([0, 1, 1, 1, 2, 2, 3]))


def path_to(tree: DraftTree, node: int) -> list[int]:
    path = [node]
    while int(tree.parents[path[-1]]) >= 0:
        path.append(int(tree.parents[path[-1]]))
    return path[::-1]


def smollm2_shaped_target(layers: int = 2):
    """SmolLM2-135M's attention shapes (9 heads of 64, 3 KV heads), a few layers, random
    weights through a Q4_1 round trip: where the kernel's sums showed their dependence on
    the number of keys (a 4-token chain after 124 cached tokens)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=512, tie_word_embeddings=True)
    target = LlamaForCausalLM(cfg).eval()
    torch.nn.init.normal_(target.model.embed_tokens.weight, std=1.0)  # activations of a real model's size
    return q4_1_model(target)


@needs_int4
def test_every_tree_row_is_its_one_token_steps_bit_for_bit():
    # the property greedy speculative decoding needs from an int4 target.  Cache lengths
    # where the shared fp32 path (decoding_session(target, False)) gave other bits on the
    # project's Xeon (16 of 980 rows over lengths 60-199, all 7 rows at 158): the sums
    # depend on the number of keys, so the exact path is tested where that shows
    target = smollm2_shaped_target()
    assert quantize_exact_int4(target) > 0
    differing = []
    for past in (73, 74, 93, 109, 155, 158, 187, 189):
        ids = torch.randint(0, 1024, (1, past), generator=torch.Generator().manual_seed(past))
        cache, attention = target_session(target)
        assert isinstance(cache, DecodingCache) and cache.layers[0].dtype == torch.float64
        with torch.inference_mode(), attention:
            prefill(target, ids, cache)
            features, _ = verify_tree(target, TREE, cache, past)
            for node in range(len(TREE)):
                crop_cache(cache, past)
                for depth, u in enumerate(path_to(TREE, node)):
                    step, _ = target_forward(target, TREE.tokens[u].view(1, 1), cache,
                                             torch.tensor([[past + depth]]),
                                             causal_mask(past + depth, 1))
                if not torch.equal(step[0], features[node]):
                    differing.append((past, node))
    assert differing == []


def test_exact_attention_computes_the_same_function():
    # an fp32 model through the fp64 path: the same numbers as the shared fp32 path
    target = tiny_target()
    ids = torch.randint(0, 1024, (1, 20), generator=torch.Generator().manual_seed(0))
    outs = []
    for exact in (False, True):
        cache, attention = decoding_session(target, exact)
        assert cache.layers[0].dtype == (torch.float64 if exact else None)
        with torch.inference_mode(), attention:
            prefill(target, ids, cache)
            outs.append(verify_tree(target, TREE, cache, 20))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_fp64_cache_stays_fp64_through_the_loops_upkeep():
    target = tiny_target()
    cache, attention = decoding_session(target, True)
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), attention:
        prefill(target, ids, cache)
        verify_tree(target, TREE, cache, 12)
        keep_path_rows(cache, 12, path_to(TREE, 6))
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.float64 and layer.keys.shape[-2] == 12 + 4
    assert decoding_session(target, False)[0].layers[0].dtype is None
    target.compile()  # a compiled model keeps the cache its graphs are traced on
    assert type(decoding_session(target, True)[0]) is DynamicCache


def test_the_models_own_causal_call_prefills_as_the_explicit_mask_does():
    # autoregressive_generate calls the model without a mask; the tree loops pass one
    target = tiny_target()
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(2))
    logits = []
    for explicit in (False, True):
        cache, attention = decoding_session(target, True)
        with torch.inference_mode(), attention:
            if explicit:
                logits.append(prefill(target, ids, cache)[1])
            else:
                logits.append(target(input_ids=ids, use_cache=True,
                                     **cache_kwargs(target, cache)).logits[0])
    assert torch.equal(*logits)


def test_the_decoding_cache_grows_and_keeps_its_rows_in_place():
    # what DynamicCache's torch.cat gave: the concatenation, through growth and crops
    cache = DecodingCache(tiny_target().config)
    chunks = [torch.randn(1, 2, n, 16) for n in (300, 300, 5)]
    for chunk in chunks[:2]:  # 600 rows: past the first buffer's 512
        for index in reversed(range(len(cache.layers))):  # every layer, as a forward does
            keys, values = cache.update(chunk, -chunk, index)
    layer = cache.layers[0]
    assert torch.equal(keys, torch.cat(chunks[:2], -2)) and torch.equal(values, -keys)
    buffer = layer.key_buffer
    crop_cache(cache, 550)  # a view of the same buffer, strided: no copy
    assert layer.keys.shape[-2] == 550 and layer.keys.data_ptr() == buffer.data_ptr()
    keys, _ = cache.update(chunks[2], -chunks[2], 0)
    assert layer.key_buffer is buffer  # written in place
    assert torch.equal(keys, torch.cat([chunks[0], chunks[1][:, :, :250], chunks[2]], -2))
