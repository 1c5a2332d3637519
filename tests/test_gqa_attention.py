"""Grouped-query attention without repeat_kv (spec.attention): bit for bit HF's SDPA."""
import contextlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from microspec_compile.heads import EagleHead
from microspec_compile.spec.attention import GQA_SDPA, gqa_attention
from microspec_compile.spec.tree import DraftTree, causal_mask
from microspec_compile.spec.verify import prefill, verify_tree


def gqa_target(kv_heads: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


TREE = DraftTree(torch.tensor([5, 7, 9, 11, 13, 17]), torch.tensor([-1, 0, 0, 1, 1, 2]),
                 torch.tensor([0, 1, 1, 2, 2, 2]))


def verify_outputs(target, use_gqa: bool):
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=target.config)
    one_token = DraftTree(torch.tensor([3]), torch.tensor([-1]), torch.tensor([0]))
    attention = gqa_attention(target.config) if use_gqa else contextlib.nullcontext()
    with torch.inference_mode(), attention:
        pre = prefill(target, prompt, cache)
        tree = verify_tree(target, TREE, cache, 20)
        step = verify_tree(target, one_token, cache, 20 + len(TREE))
    return [t for pair in (pre, tree, step) for t in pair]


# Why each case: 2 KV heads for 4 heads (the repeat_kv path it replaces; SmolLM2 has 3 for
# 9), and 4 for 4 (no groups: handed to HF's function untouched).
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_prefill_tree_and_step_are_bit_identical(kv_heads):
    target = gqa_target(kv_heads)
    plain, gqa = verify_outputs(target, False), verify_outputs(target, True)
    for a, b in zip(plain, gqa):
        assert torch.equal(a, b)
    assert target.config._attn_implementation == "sdpa"  # restored after the block


def test_gqa_path_really_runs_and_skips_repeat_kv(monkeypatch):
    import transformers.integrations.sdpa_attention as hf_sdpa

    calls, repeat_kv = [], hf_sdpa.repeat_kv
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda *a: calls.append(1) or repeat_kv(*a))
    target = gqa_target(2)

    def run():
        cache = DynamicCache(config=target.config)
        prefill(target, torch.arange(8).view(1, -1), cache)
        verify_tree(target, TREE, cache, 8)

    with torch.inference_mode():
        run()
        assert calls, "HF's SDPA path should repeat the KV heads here (else this test is moot)"
        calls.clear()
        with gqa_attention(target.config):
            assert target.config._attn_implementation == GQA_SDPA
            run()
    assert calls == []


def test_other_implementations_are_left_alone():
    target = gqa_target(2)
    target.config._attn_implementation = "eager"
    with gqa_attention(target.config):
        assert target.config._attn_implementation == "eager"
    with gqa_attention(object()):  # a config without an attention implementation: no-op
        pass


def test_eagle_head_attends_alike():
    target = gqa_target(2)
    head = EagleHead.for_target(target).eval()
    feats = torch.randn(1, 10, 64)
    ids = torch.randint(0, 256, (1, 10))
    pos = torch.arange(10).view(1, -1)
    mask = causal_mask(0, 10)
    with torch.inference_mode():
        plain = head.hidden(ids, feats, pos, mask)
        with gqa_attention(head.attention_config):
            assert head.attention_config._attn_implementation == GQA_SDPA
            gqa = head.hidden(ids, feats, pos, mask)
    assert torch.equal(plain, gqa)
