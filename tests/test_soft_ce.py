"""The chunked soft cross-entropy of EAGLE training against the plain autograd expression."""
import pytest
import torch

from microspec_compile.apps.train.soft_ce import linear_soft_cross_entropy


def _reference(pred, true, lm_head):
    """What the trainer computed before: full [N, V] logits through autograd."""
    z, t = lm_head(pred), lm_head(true)
    ce = -(torch.softmax(t, -1) * torch.log_softmax(z, -1)).sum(-1).mean()
    return ce, int((z.argmax(-1) == t.argmax(-1)).sum())


def _case(rows, hidden=16, vocab=300, bias=False, seed=0):
    torch.manual_seed(seed)
    lm_head = torch.nn.Linear(hidden, vocab, bias=bias).requires_grad_(False)  # frozen, as trained
    pred = torch.randn(rows, hidden, requires_grad=True)
    # half the rows close to their target so that some argmaxes agree
    true = torch.cat([pred.detach()[: rows // 2] + 0.01 * torch.randn(rows // 2, hidden),
                      torch.randn(rows - rows // 2, hidden)])
    return pred, true, lm_head


@pytest.mark.parametrize("fused", [True, False])   # Inductor-fused chunk terms, and eager
@pytest.mark.parametrize("rows,chunk", [
    (37, 5),     # the last chunk is shorter: symbolic rows in the compiled terms
    (40, 8),     # chunks divide the rows
    (6, 256),    # one chunk, smaller than the chunk size
])
def test_matches_autograd_reference(fused, rows, chunk):
    pred, true, lm_head = _case(rows)
    ref, ref_agree = _reference(pred, true, lm_head)
    ref.backward()
    ref_grad, pred.grad = pred.grad.clone(), None
    ce, agree = linear_soft_cross_entropy(pred, true, lm_head, chunk=chunk, fused=fused)
    (2.0 * ce).backward()  # the incoming gradient scales the saved one
    assert torch.allclose(ce, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pred.grad, 2.0 * ref_grad, rtol=1e-4, atol=1e-7)
    assert int(agree) == ref_agree and 0 < ref_agree < rows


def test_bias_and_bf16_products():
    # an LM head with a bias; bf16 products (what training uses on CPUs with bf16 units)
    pred, true, lm_head = _case(24, bias=True)
    ref, _ = _reference(pred, true, lm_head)
    ref.backward()
    ref_grad, pred.grad = pred.grad.clone(), None
    ce, _ = linear_soft_cross_entropy(pred, true, lm_head, compute_dtype=torch.bfloat16, chunk=7)
    ce.backward()
    assert abs(ce.item() - ref.item()) < 0.02 * ref.item()
    assert pred.grad.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(pred.grad.view(-1), ref_grad.view(-1), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("pred_shape,true_shape,chunk,match", [
    ((4, 16), (5, 16), 8, "both be"),       # rows do not pair
    ((4, 8), (4, 8), 8, "do not fit"),      # hidden size is not the LM head's
    ((0, 16), (0, 16), 8, "no rows"),       # nothing carries the loss
    ((4, 16), (4, 16), 0, "chunk"),
])
def test_bad_input_is_a_clear_error(pred_shape, true_shape, chunk, match):
    lm_head = torch.nn.Linear(16, 50, bias=False)
    with pytest.raises(ValueError, match=match):
        linear_soft_cross_entropy(torch.randn(pred_shape), torch.randn(true_shape), lm_head,
                                  chunk=chunk)


def test_rows_restrict_both_distributions_to_those_vocabulary_rows():
    """``rows``: the same loss and gradient as a head made of those rows alone."""
    pred, true, lm_head = _case(20, bias=True)
    rows = torch.tensor([7, 3, 250, 11, 0, 42, 199])
    sub = torch.nn.Linear(16, len(rows), bias=True).requires_grad_(False)
    sub.weight.copy_(lm_head.weight[rows])
    sub.bias.copy_(lm_head.bias[rows])
    ref, ref_agree = _reference(pred, true, sub)
    ref.backward()
    ref_grad, pred.grad = pred.grad.clone(), None
    ce, agree = linear_soft_cross_entropy(pred, true, lm_head, chunk=6, rows=rows)
    ce.backward()
    assert torch.allclose(ce, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pred.grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert int(agree) == ref_agree
    full, _ = linear_soft_cross_entropy(pred.detach(), true, lm_head)
    assert not torch.allclose(ce, full)  # the restriction changes the loss
    with pytest.raises(ValueError, match="int64"):
        linear_soft_cross_entropy(pred, true, lm_head, rows=rows.int())
