"""The README's Hugging Face pattern reaches a steady state: after the first requests, assisted
generation with both models compiled in place compiles nothing more, and stays lossless.

Both models' forwards are wrapped by the same transformers decorator, so their graphs are
cache entries of one code object and count together towards Dynamo's ``recompile_limit``
(8 by default). Past it, Dynamo silently runs the frame uncompiled. The pattern compiles
with ``dynamic=True`` (prompt and cache lengths are symbolic from the first call) and raises
the limit to :data:`RECOMPILE_LIMIT` (the README says so).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import microspec_compile

pytestmark = pytest.mark.slow
RECOMPILE_LIMIT = 16  # the README's setting: the graphs both models need, with room to spare


def _llama(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=1, bos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _generate(model, prompt, **kwargs):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=10, **kwargs)


@pytest.mark.hf_inductor_cpu
def test_assisted_generation_compiles_once_and_stays_lossless():
    torch._dynamo.reset()
    torch.manual_seed(0)
    target, draft = _llama(3), _llama(1)
    draft.load_state_dict(target.state_dict(), strict=False)  # a draft that sometimes agrees
    prompts = [torch.randint(2, 2048, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (5, 9, 13, 7, 11, 6, 15)]
    expected = [_generate(target, p) for p in prompts]

    rewritten = counters["microspec"]["heads_rewritten"]
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never a silent eager fallback
    try:
        draft.compile(backend=microspec_compile.backend(pinned_ids=[1]), dynamic=True)
        target.compile(backend=microspec_compile.observer(draft), dynamic=True)
        warm = [_generate(target, p, assistant_model=draft) for p in prompts[:4]]
        frames, calls = counters["frames"]["total"], dict(counters["microspec"])
        steady = [_generate(target, p, assistant_model=draft) for p in prompts[4:]]
        assert counters["frames"]["total"] == frames, "a new request compiled again"
        # ... and ran compiled code: past the limit Dynamo runs frames eagerly, compiling nothing
        for runtime in ("sparse_calls", "target_observe_calls"):
            assert counters["microspec"][runtime] > calls[runtime], runtime
    finally:
        torch._dynamo.config.recompile_limit = 8
        torch._dynamo.config.fail_on_recompile_limit_hit = False
        torch._dynamo.reset()
    assert counters["microspec"]["heads_rewritten"] > rewritten
    for got, want in zip(warm + steady, expected):
        assert torch.equal(got, want)
