"""Every LM-head spelling the backend must rewrite, checked against the dense head
restricted to the active vocabulary.

Each case is a head ``logits(x)`` and a consumer ``post(logits)``; the compiled
module computes ``post(logits(x))`` and the reference is
``post(logits(x) masked to -inf outside the active set)``: the same code, so the
test states exactly what "sparse" means for every consumer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import microspec_compile as mc
from microspec_compile.vocab import ActiveVocab

V, H, CAP = 333, 24, 64


class Head(nn.Module):
    def __init__(self, spelling, post, bias=False, dtype=torch.float32):
        super().__init__()
        self.lm_head = nn.Linear(H, V, bias=bias, dtype=dtype)
        self.spelling, self.post = spelling, post

    def logits(self, x):
        w, b = self.lm_head.weight, self.lm_head.bias
        if self.spelling == "module":
            return self.lm_head(x)
        if self.spelling == "functional":
            return F.linear(x, w, b)
        if self.spelling == "matmul_t":
            return x @ w.t()
        if self.spelling == "matmul_T":
            return torch.matmul(x, w.T)
        if self.spelling == "matmul_transpose":
            return x @ w.transpose(0, 1)
        raise AssertionError(self.spelling)

    def forward(self, x):
        return self.post(self.logits(x))


# (id, spelling, bias, input shape, consumer, why the case exists)
CASES = [
    ("logits-2d", "module", False, (3, H), lambda l: l, "HF-style raw logits, 2-D"),
    ("logits-3d-bias", "module", True, (2, 5, H), lambda l: l, "bias gathered through ids, 3-D"),
    ("softmax-fn", "functional", False, (4, H), lambda l: torch.softmax(l, dim=-1), "probs, 0 outside S"),
    ("softmax-F-posdim", "module", False, (4, H), lambda l: F.softmax(l, dim=1), "dim spelled as rank-1"),
    ("log_softmax-method", "matmul_t", False, (2, H), lambda l: l.log_softmax(dim=-1), "x @ W.t() spelling"),
    ("topk-method", "matmul_T", False, (5, H), lambda l: l.topk(4), "x @ W.T, top-k ids mapped back"),
    ("topk-kwargs", "functional", True, (2, 3, H), lambda l: torch.topk(l, k=6, dim=-1), "kwargs, 3-D"),
    ("log_softmax-topk", "module", False, (2, 7, H),
     lambda l: l[:, -1, :].log_softmax(dim=-1).topk(3), "EAGLE: slice, log-softmax, top-k"),
    ("softmax-topk", "matmul_transpose", False, (6, H),
     lambda l: F.softmax(l, dim=-1).topk(10), "EAGLE-2 tree: 10 rows, renormalised probs"),
    ("argmax", "module", False, (4, H), lambda l: l.argmax(dim=-1), "greedy draft"),
    ("argmax-keepdim", "functional", False, (2, 3, H), lambda l: torch.argmax(l, -1, keepdim=True), "keepdim"),
    ("slice-last-logits", "module", False, (2, 9, H), lambda l: l[:, -1, :], "HF logits[:, -1, :]"),
    ("slice-int-argmax", "module", True, (2, 9, H), lambda l: l[:, -1].argmax(-1), "short index form"),
    ("log_softmax-argmax", "module", False, (3, H), lambda l: torch.log_softmax(l, -1).argmax(-1), "norm + argmax"),
    ("slice-range-logits", "module", False, (2, 9, H), lambda l: l[:, 2:5], "a range of rows"),
    ("ellipsis-softmax", "module", False, (2, 4, H), lambda l: l[..., 1, :].softmax(-1), "ellipsis not last: no move"),
]


# Which fused form each case must reach (counter heads_<kind>_<normalize>).
EXPECTED_FORM = {
    "logits-2d": "full_none", "logits-3d-bias": "full_none", "softmax-fn": "full_softmax",
    "softmax-F-posdim": "full_softmax", "log_softmax-method": "full_log_softmax",
    "topk-method": "topk_none", "topk-kwargs": "topk_none", "log_softmax-topk": "topk_log_softmax",
    "softmax-topk": "topk_softmax", "argmax": "argmax_none", "argmax-keepdim": "argmax_none",
    "slice-last-logits": "full_none", "slice-int-argmax": "argmax_none",
    "log_softmax-argmax": "argmax_log_softmax", "slice-range-logits": "full_none",
    "ellipsis-softmax": "full_none",
}


def masked_reference(model: Head, x: torch.Tensor, active: torch.Tensor):
    with torch.no_grad():
        logits = model.logits(x)
        mask = torch.zeros(V, dtype=torch.bool)
        mask[active] = True
        return model.post(logits.masked_fill(~mask, float("-inf")))


def assert_outputs_equal(out, ref, active):
    if isinstance(ref, tuple):  # topk: (values, indices)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out[1], ref[1])
        assert torch.isin(out[1], active).all()
    elif ref.dtype == torch.int64:  # argmax
        assert torch.equal(out, ref)
        assert torch.isin(out, active).all()
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def compile_with_vocab(model: Head, active: torch.Tensor, **config):
    vocab = ActiveVocab(model.lm_head.weight, CAP)
    vocab.observe(active)
    config.setdefault("min_vocab_size", 100)
    return torch.compile(model, backend=mc.backend(vocab=vocab, **config)), vocab


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rewrite_matches_masked_dense_head(case):
    name, spelling, bias, shape, post, _why = case
    torch.manual_seed(0)
    model = Head(spelling, post, bias=bias).eval()
    active = torch.randperm(V)[:40]
    compiled, _ = compile_with_vocab(model, active)
    counters.clear()
    x = torch.randn(shape)
    with torch.no_grad():
        out = compiled(x)
    assert counters["microspec"]["heads_rewritten"] == 1
    assert counters["microspec"][f"heads_{EXPECTED_FORM[name]}"] == 1
    assert counters["microspec"]["sparse_calls"] == 1
    assert_outputs_equal(out, masked_reference(model, x, active), active)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # low-precision drafts
def test_low_precision_heads(dtype):
    torch.manual_seed(0)
    model = Head("module", lambda l: l.log_softmax(-1).topk(5), dtype=dtype).eval()
    active = torch.randperm(V)[:50]
    compiled, _ = compile_with_vocab(model, active)
    x = torch.randn(3, H, dtype=dtype)
    with torch.no_grad():
        values, ids = compiled(x)
        ref_values, ref_ids = masked_reference(model, x, active)
    assert values.dtype == dtype
    assert torch.isin(ids, active).all()
    # fp32 accumulation vs a low-precision reference: compare at the dtype's resolution
    torch.testing.assert_close(values.float(), ref_values.float(), rtol=2e-2, atol=2e-2)


def test_generated_code_has_no_dense_vocabulary_matmul():
    model = Head("module", lambda l: l.log_softmax(-1).topk(3)).eval()
    active = torch.arange(0, V, 7)
    compiled, _ = compile_with_vocab(model, active)
    with torch.no_grad():
        _, (code,) = run_and_get_code(compiled, torch.randn(2, H))
    assert "microspec.sparse_topk" in code
    assert "mm(" not in code and "addmm" not in code, "a dense matmul survived the rewrite"


def test_head_filter_and_gradient_mode():
    model = Head("module", lambda l: l.argmax(-1))
    active = torch.arange(10)
    compiled, _ = compile_with_vocab(model, active, head="no_such_weight")
    counters.clear()
    with pytest.warns(UserWarning, match="no LM head found"):
        compiled(torch.randn(2, H))
    assert counters["microspec"]["heads_rewritten"] == 0
    torch._dynamo.reset()
    compiled, _ = compile_with_vocab(model, active)
    out = compiled(torch.randn(2, H))  # grad mode on: the sparse head carries no gradient
    assert torch.isin(out, active).all()
