"""``microspec::small_batch_linear`` and the pass that routes tall Linears (LM heads) to it."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import microspec_compile as mc
from microspec_compile.kernels.small_batch_linear import (
    small_batch_linear_reference,
    takes_transposed_path,
)

op = torch.ops.microspec.small_batch_linear.default


@pytest.mark.parametrize("shape", [
    (1, 24),      # one row: F.linear (a gemv is already the fastest)
    (2, 24),      # the smallest transposed case
    (5, 24),      # gamma = 4 verification
    (1, 16, 24),  # 16 rows in HF's [batch, seq, hidden] layout: the threshold itself
    (17, 24),     # one past the threshold: F.linear
    (2, 3, 24),   # batch 2 flattened to 6 rows and back
])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear(shape, bias):
    torch.manual_seed(len(shape) + shape[0])
    x, w = torch.randn(shape), torch.randn(400, 24)
    b = torch.randn(400) if bias else None
    out = op(x, w, b, 16)
    assert out.shape == (*shape[:-1], 400) and out.is_contiguous()
    torch.testing.assert_close(out, small_batch_linear_reference(x, w, b), rtol=1e-5, atol=1e-5)


def test_path_choice():
    w = torch.randn(400, 24)
    assert takes_transposed_path(torch.randn(5, 24), w, 16)
    assert not takes_transposed_path(torch.randn(1, 24), w, 16)
    assert not takes_transposed_path(torch.randn(17, 24), w, 16)
    assert not takes_transposed_path(torch.randn(5, 24, dtype=torch.bfloat16), w.bfloat16(), 16)


def test_opcheck_and_bad_shapes():
    x, w, b = torch.randn(5, 24), torch.randn(400, 24), torch.randn(400)
    torch.library.opcheck(op, (x, w, b, 16))
    torch.library.opcheck(op, (torch.randn(1, 24), w, None, 16))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        op(torch.randn(5, 23), w, b, 16)


class MlpAndHead(nn.Module):
    """Two MLP linears (not tall: left alone) and a 400 x 24 head (tall: rewritten)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(24, 64), nn.Linear(64, 24, bias=False)
        self.head = nn.Linear(24, 400)

    def forward(self, x):
        return self.head(x + self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize("inductor", [False, True])
def test_backend_option_rewrites_tall_linears_only(inductor):
    torch.manual_seed(0)
    model, x = MlpAndHead().eval(), torch.randn(5, 24)
    expected = model(x)
    # min_vocab_size above 400: no sparse head, so the dense head meets the pass
    backend = mc.backend(small_batch_linear=16, inductor=inductor, min_vocab_size=10_000)
    counters.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-head fallback warns once per config
        got = torch.compile(model, backend=backend)(x)
    assert counters["microspec"]["small_batch_linears"] == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_off_by_default():
    assert mc.MicrospecConfig().small_batch_linear == 0
    counters.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(MlpAndHead().eval(), backend=mc.backend(min_vocab_size=10_000))(
            torch.randn(5, 24))
    assert counters["microspec"]["small_batch_linears"] == 0


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1200, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_observer_with_small_batch_linear_and_k0():
    draft, ids = _tiny_llama(1), torch.randint(1, 1200, (1, 5))  # 5 rows: the transposed path
    with torch.no_grad():
        expected = _tiny_llama(0)(ids).logits
    for k in (3, 0):  # k = 0: the target compiled the same way without the top-k signal
        target = _tiny_llama(0)
        target.compile(backend=mc.observer(draft, k=k, capacity=64, small_batch_linear=16))
        counters.clear()
        with torch.no_grad():
            got = target(ids).logits
        assert counters["microspec"]["small_batch_linears"] == 1  # the 1200 x 64 head only
        assert counters["microspec"]["target_topk_inserted"] == (1 if k else 0)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k must be >= 0"):
        mc.observer(draft, k=-1)


@pytest.mark.parametrize("bad", [-1, 1])  # negative, and 1 row (nothing to transpose)
def test_bad_small_batch_linear_setting_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="small_batch_linear must be 0"):
        mc.MicrospecConfig(small_batch_linear=bad)
