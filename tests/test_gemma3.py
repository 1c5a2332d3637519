"""Gemma 3's architecture in every decoding loop, on tiny random Gemma-3-shaped models.

Gemma 3 interleaves sliding-window and global attention layers, normalises queries and
keys, scales its embedding by sqrt(hidden) and ties its LM head to the embedding.  The
window here (6 positions) is shorter than every sequence decoded, so a loop that gave a
sliding layer the global mask, or a cache that dropped rows, would emit other tokens.
"""
from __future__ import annotations

import pytest
import torch
from test_int4_linear import needs_int4, q4_1_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from microspec_compile.heads import EagleHead
from microspec_compile.spec import (
    DecoderConfig,
    TopkScorer,
    TreeConfig,
    autoregressive_generate,
    eagle_generate,
    lookup_generate,
    prepare,
)
from microspec_compile.spec.attention import layer_masks
from microspec_compile.spec.cache import BufferedLayer, DecodingCache
from microspec_compile.spec.tree import causal_mask
from microspec_compile.spec.verify import prefill, target_forward

VOCAB, WINDOW = 1024, 6


def tiny_gemma(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=16, sliding_window=WINDOW, max_position_embeddings=512,
                           layer_types=["sliding_attention", "full_attention",
                                        "sliding_attention"],
                           tie_word_embeddings=True, attn_implementation="sdpa")
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms (zero-initialised in HF): q/k norms that matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def prompt(n: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_loops_cache_keeps_every_row_of_sliding_layers():
    cache = DecodingCache(tiny_gemma().config)
    assert all(isinstance(layer, BufferedLayer) for layer in cache.layers)


def test_layer_masks_apply_the_window_to_sliding_layers_only():
    config = tiny_gemma().config
    past, rows = 10, 3
    mask = causal_mask(past, rows)
    positions = torch.tensor([[past, past + 1, past + 1]])  # a tree: two nodes at one depth
    masks = layer_masks(config, mask, positions)
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert masks["full_attention"] is mask
    seen = masks["sliding_attention"][0, 0] == 0
    # a query at position q sees cached row k iff q - k < WINDOW
    for r, q in enumerate(positions[0].tolist()):
        for k in range(past):
            assert bool(seen[r, k]) == (q - k < WINDOW and k <= q)
    assert torch.equal(seen[:, past:], mask[0, 0, :, past:] == 0)  # the new rows: as given
    llama_like = type("Config", (), {"layer_types": ["full_attention"], "sliding_window": None})
    assert layer_masks(llama_like, mask, positions) is mask


@torch.inference_mode()
def test_one_forward_over_many_rows_scores_as_one_token_steps():
    """Past the window, a verification's logits are the one-token steps' logits."""
    target = tiny_gemma()
    ids = prompt(16)
    steps = DecodingCache(target.config)
    prefill(target, ids[:, :4], steps)
    expected = []
    for t in range(4, 16):
        _, logits = target_forward(target, ids[:, t:t + 1], steps, torch.tensor([[t]]),
                                   causal_mask(t, 1))
        expected.append(logits)
    many = DecodingCache(target.config)
    prefill(target, ids[:, :4], many)
    _, logits = target_forward(target, ids[:, 4:], many, torch.arange(4, 16).view(1, -1),
                               causal_mask(4, 12))
    torch.testing.assert_close(logits, torch.cat(expected), rtol=1e-4, atol=1e-4)


def test_target_alone_equals_hugging_face_generate():
    target = tiny_gemma()
    ids = prompt()
    out, _ = autoregressive_generate(target, ids, 20)
    ref = target.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          attention_mask=torch.ones_like(ids))
    assert torch.equal(out.view(-1), ref[0])


@pytest.mark.parametrize("shape", [TreeConfig(depth=3, top_k=4, total_tokens=8, lookup=0),
                                   TreeConfig(depth=3, top_k=4, total_tokens=8, lookup=4)])
def test_eagle_and_lookup_decode_the_targets_greedy_output(shape):
    target = tiny_gemma()
    head = EagleHead.for_target(target).eval()
    ids = torch.cat([prompt(), prompt()], 1)  # recurring context: lookup finds chains
    expected, _ = autoregressive_generate(target, ids, 24)
    out, _ = eagle_generate(target, head, TopkScorer(target.lm_head, shape.top_k), ids, 24, shape)
    assert torch.equal(out, expected)
    if shape.lookup:
        looked_up, _ = lookup_generate(target, ids, 24, shape.lookup)
        assert torch.equal(looked_up, expected)


def test_microspec_decoder_on_gemma():
    """The backend finds Gemma's tied head through the decoder's scorer and stays exact."""
    target = tiny_gemma()
    head = EagleHead.for_target(target).eval()
    ids = prompt()
    config = DecoderConfig(head="microspec", tree=TreeConfig(depth=2, top_k=4, total_tokens=6,
                                                             lookup=4),
                           capacity=256, pinned_ids=(1,), pack_target=False)
    decoder = prepare(target, head, config)
    out, _ = decoder.generate(ids, 16)
    assert torch.equal(out, autoregressive_generate(target, ids, 16)[0])
    assert decoder.vocab.contains(out[0]).all()


# The matcher on Gemma's own graph: a whole Gemma3ForCausalLM compiled by the backend (the
# Hugging Face assisted-generation spelling). Its head is the embedding's table (tied) and the
# embedding is scaled, and larger Gemmas cap their logits as tanh(logits / c) * c after the
# head, which maps the sparse head's -inf outside the active set to -c unless the rewrite puts
# it back.
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["gemma3-270m", "final-logit-softcap"])
def test_backend_rewrites_gemmas_tied_head(softcap):
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    import microspec_compile as mc

    target = tiny_gemma()
    target.config.final_logit_softcapping = softcap
    assert target.lm_head.weight is target.model.embed_tokens.weight
    vocab = mc.vocab_of(target, capacity=64)
    active = torch.arange(100, 140)
    vocab.observe(active)
    compiled = torch.compile(target, backend=mc.backend(capacity=64, min_vocab_size=10))
    ids = prompt()
    counters.clear()
    with torch.no_grad():
        (out,), code = run_and_get_code(lambda: (compiled(ids).logits,))
        dense = target(ids).logits
    assert counters["microspec"]["heads_rewritten"] == 1
    assert counters["microspec"]["heads_full_none"] == 1
    inside = vocab.contains(torch.arange(VOCAB))
    assert set(active.tolist()) | set(ids[0].tolist()) <= set(inside.nonzero().view(-1).tolist())
    assert torch.isneginf(out[..., ~inside]).all(), "a token outside the vocabulary is scored"
    torch.testing.assert_close(out[..., inside], dense[..., inside], rtol=1e-4, atol=1e-4)
    assert "microspec.sparse_full" in "".join(code)


@needs_int4
def test_an_int4_gemma_decodes_its_own_greedy_output():
    """A Gemma target whose linears are exact 4-bit groups (a de-quantized Q4 GGUF) runs them
    through the int4 kernel; the loops then attend exactly, sliding layers included, and
    EAGLE-2 and the lookup emit what the int4 target emits by itself."""
    from microspec_compile.linears import TargetConfig, needs_exact_attention, prepare_target

    target = q4_1_model(tiny_gemma())
    assert prepare_target(target, TargetConfig("int4")).startswith("int4 (21 ")
    assert needs_exact_attention(target)
    ids = torch.cat([prompt(), prompt()], 1)
    expected, _ = autoregressive_generate(target, ids, 24)
    shape = TreeConfig(depth=3, top_k=4, total_tokens=8, lookup=4)
    head = EagleHead.for_target(target).eval()
    out, _ = eagle_generate(target, head, TopkScorer(target.lm_head, shape.top_k), ids, 24, shape)
    assert torch.equal(out, expected)
    looked_up, _ = lookup_generate(target, ids, 24, shape.lookup)
    assert torch.equal(looked_up, expected)
