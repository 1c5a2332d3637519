"""EAGLE's soft cross-entropy through the target's LM head, in row chunks.

The loss of an EAGLE head compares the LM head's scores of the predicted feature
with the target's own next-token distribution, over the full vocabulary:

    ce = mean_i [ logsumexp(W h_i) - sum_v p_iv (W h_i)_v ],   p_i = softmax(W f_i)

Written with autograd (``log_softmax(head(pred))`` against ``softmax(head(true))``)
it materialises several ``[N, V]`` fp32 tensors per step (logits, their copies,
the softmaxes, their product and the backward's), each hundreds of MB for a
4096-token batch of a 49k vocabulary: on a 2-core CPU those memory-bound passes
took about 80% of a training step, the LM-head products 15%.

Here the rows go in chunks of ``chunk``: the two products, the softmaxes (one
Inductor-fused function per chunk) and the gradient ``dce/dh_i = (softmax(W h_i) -
p_i) W / N`` are computed per chunk and the gradient is kept for ``backward``, so no
``[N, V]`` tensor exists
and nothing is recomputed (``W`` is frozen: no gradient for it).  The values are
the same expression; the tests compare loss and gradient with the autograd one.

``rows`` restricts both distributions to a set of vocabulary rows (a cheaper objective
for large vocabularies: on Gemma 3's 262,144 rows one full-vocabulary step of 4096
positions costs three products of ~4 s each on a 2-core CPU); the trainer gives the
batch's own tokens plus the most frequent training tokens.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["linear_soft_cross_entropy"]


def _chunk_terms(z: torch.Tensor, t: torch.Tensor):
    """``(sum of the chunk's CE rows, softmax(z) - softmax(t) in z's dtype, agreeing rows)``
    of LM-head scores ``z`` (the head's) and ``t`` (the target's), both ``[r, V]``."""
    dtype = z.dtype
    z, t = z.float(), t.float()
    z_max, z_arg = z.max(-1, keepdim=True)
    t_max, t_arg = t.max(-1, keepdim=True)
    p = (t - t_max).exp()
    p = p / p.sum(-1, keepdim=True)
    e = (z - z_max).exp()
    s = e.sum(-1, keepdim=True)
    ce = (z_max + s.log()).sum() - (p * z).sum()
    return ce, (e / s - p).to(dtype), (z_arg == t_arg).sum()


@functools.cache
def _fused_chunk_terms():
    # Inductor fuses the passes over the chunk (measured on a 2-core Xeon, 256 x 49152 bf16
    # scores: 43 ms compiled, 195 ms eager, mostly fresh [r, V] fp32 temporaries).  Only the
    # rows are symbolic (the last chunk is shorter): a symbolic vocabulary ran 2x slower.
    return torch.compile(_chunk_terms, dynamic=False)


class _LinearSoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, true, weight, bias, compute_dtype, chunk, fused):
        terms = _fused_chunk_terms() if fused else _chunk_terms
        n = pred.shape[0]
        with torch.autocast(pred.device.type, enabled=False):  # dtypes are explicit here
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            grad = torch.empty(pred.shape, dtype=compute_dtype, device=pred.device)
            total = torch.zeros((), dtype=torch.float64, device=pred.device)
            agree = torch.zeros((), dtype=torch.int64, device=pred.device)
            for a in range(0, n, chunk):
                z = F.linear(pred[a:a + chunk].to(compute_dtype), w, b)  # [r, V]
                t = F.linear(true[a:a + chunk].to(compute_dtype), w, b)
                if fused:
                    torch._dynamo.mark_dynamic(z, 0)
                    torch._dynamo.mark_dynamic(t, 0)
                ce, q, same = terms(z, t)
                total += ce
                agree += same
                torch.mm(q, w, out=grad[a:a + chunk])  # dce_i/dh_i = (softmax(z_i) - p_i) W
        ctx.save_for_backward(grad)
        ctx.pred_dtype, ctx.n = pred.dtype, n
        ctx.mark_non_differentiable(agree)
        return (total / n).float(), agree

    @staticmethod
    def backward(ctx, grad_loss, _grad_agree):
        (grad,) = ctx.saved_tensors
        return (grad * (grad_loss / ctx.n)).to(ctx.pred_dtype), None, None, None, None, None, None


def linear_soft_cross_entropy(pred: torch.Tensor, true: torch.Tensor, lm_head: torch.nn.Linear, *,
                              compute_dtype: torch.dtype = torch.float32,
                              chunk: int = 256, fused: bool = True,
                              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft cross-entropy of ``lm_head(pred)`` against ``softmax(lm_head(true))``, and top-1 agreement.

    Parameters
    ----------
    pred : [N, H] the head's predicted features (the gradient flows to them)
    true : [N, H] the target's features (no gradient)
    lm_head : the target's LM head ``Linear(H, V)`` (frozen: no gradient)
    compute_dtype : dtype of the two products (bf16 where the CPU runs it faster; the
        softmaxes are fp32 either way)
    chunk : rows per chunk (a few ``[chunk, V]`` buffers at a time)
    fused : the per-chunk softmaxes compiled by Inductor (one compile per process), or eager
    rows : [R] int64 vocabulary ids; both distributions are taken over these rows only
        (None: the full vocabulary); keep R fixed across calls (one compile)

    Returns
    -------
    (mean cross-entropy, a 0-d fp32 tensor; rows whose two argmaxes agree, a 0-d int64 tensor)
    """
    if pred.dim() != 2 or pred.shape != true.shape:
        raise ValueError(f"pred and true must both be [N, H], got {list(pred.shape)} and "
                         f"{list(true.shape)}")
    if pred.shape[1] != lm_head.weight.shape[1]:
        raise ValueError(f"features of size {pred.shape[1]} do not fit the LM head "
                         f"{list(lm_head.weight.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if pred.shape[0] == 0:
        raise ValueError("no rows carry the loss")
    weight = lm_head.weight.detach()
    bias = None if lm_head.bias is None else lm_head.bias.detach()
    if rows is not None:
        if rows.dim() != 1 or rows.dtype != torch.int64 or rows.numel() == 0:
            raise ValueError(f"rows must be a non-empty [R] int64 tensor of vocabulary ids, got "
                             f"{rows.dtype} {list(rows.shape)}")
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    return _LinearSoftCrossEntropy.apply(pred, true.detach(), weight, bias, compute_dtype, chunk,
                                         fused)
