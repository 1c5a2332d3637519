"""Grouped-query attention for multi-token queries without copying the KV cache.

Hugging Face's SDPA attention handles grouped-query attention (``kv_heads <
heads``) in one of three ways: ``enable_gqa`` when there is no mask, a reshape of
the queries when there is one query token, and otherwise ``repeat_kv``, which
materialises every layer's cached keys and values ``heads / kv_heads`` times.
A tree verification (``T`` queries, a 4-D tree mask) takes the third way: on
SmolLM2-135M (9 heads, 3 KV heads, 30 layers) that copies the whole cache three
times per verification, and the copy grows with the context.

PyTorch's SDPA takes ``enable_gqa=True`` together with a mask.  On CPU its flash
kernel indexes KV head ``h // groups`` for query head ``h``, the same arithmetic as
on the repeated tensors: the results are bit for bit those of ``repeat_kv``
(tested).  :func:`gqa_attention` switches a model to that path for the duration
of a ``with`` block; every other case (one query, no mask, no groups, dropout,
position bias) is handed to Hugging Face's own SDPA function unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["GQA_SDPA", "gqa_sdpa_attention", "gqa_attention"]

GQA_SDPA = "microspec_gqa_sdpa"


def gqa_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs):
    """A Hugging Face attention function (``AttentionInterface``).

    Parameters
    ----------
    query : [B, heads, T, D]; key, value : [B, kv_heads, S, D]
    attention_mask : [B or 1, 1, T, >= S] additive float or bool mask

    Returns
    -------
    ([B, T, heads, D] attention output, None)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.shape[2] == 1 or attention_mask is None or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value,
                                         attn_mask=attention_mask[..., : key.shape[-2]],
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)


_register()


@contextlib.contextmanager
def gqa_attention(config):
    """Within the block, a model whose ``config`` uses ``"sdpa"`` attends through
    :func:`gqa_sdpa_attention` (any other implementation is left as it is)."""
    previous = getattr(config, "_attn_implementation", None)
    if previous != "sdpa":
        yield
        return
    config._attn_implementation = GQA_SDPA
    try:
        yield
    finally:
        config._attn_implementation = previous
