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

**Exact decoding attention** (:func:`decoding_session`).  Greedy speculative decoding
emits the target's own tokens only if a verification computes each row as the
target's one-token step would.  The linears can (``linears.int4`` computes
every row alike), attention cannot: the SDPA kernel's sums depend on the number of
keys and queries (measured: a 4-token chain after 124 cached tokens rounds
differently from its one-token steps, after 100-169 others it does not).  In fp32
that is about 1e-7 and the greedy tokens stayed the same; a model that rounds its
activations to bf16 (the int4 target) turns it into other tokens at near-ties
(measured: 1 of 5 demo prompts).  So for such a model the cache keeps keys and
values in fp64 (``spec.cache.DecodingCache``) and queries of up to :data:`EXACT_ROWS` rows
attend in fp64 (:func:`exact_sdpa_attention`): the orders of summation still differ,
by about 1e-16, which the cast back to fp32 almost always erases.  A longer query (a
prompt's prefill, the same in every way of decoding) attends in fp32 as above.

**Sliding-window layers** (Gemma 3 interleaves five of them with each global one).  The
loops' caches keep every row of every layer, so that all layers share one row layout
(``keep_path_rows`` and crops work on rows by position), and a sliding layer's window
lives in its mask instead: :func:`layer_masks` turns the loops' one explicit mask into
Hugging Face's per-kind mapping, and masks that Hugging Face builds itself apply the
window to the full rows by position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .cache import DecodingCache
from .tree import causal_mask

__all__ = ["GQA_SDPA", "EXACT_SDPA", "EXACT_ROWS", "gqa_sdpa_attention",
           "exact_sdpa_attention", "gqa_attention", "exact_attention", "decoding_session",
           "layer_masks", "full_rows_cache"]

GQA_SDPA = "microspec_gqa_sdpa"
EXACT_SDPA = "microspec_exact_sdpa"
EXACT_ROWS = 64  # queries up to this many rows (steps, verifications) attend in fp64


def _mask_for(attention_mask: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` ``[.., T, S]`` for ``key`` ``[.., S, D]``; a mask of another length
    means the cache was not written (or was cropped wrongly): an error, never a trim."""
    if attention_mask.shape[-1] != key.shape[-2]:
        raise RuntimeError(f"attention mask covers {attention_mask.shape[-1]} keys but the "
                           f"layer has {key.shape[-2]}: the KV cache and the mask disagree "
                           f"(a cache the model did not write?)")
    return attention_mask


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
                                         attn_mask=_mask_for(attention_mask, key),
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def exact_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, **kwargs):
    """A Hugging Face attention function over an fp64 KV cache: queries of up to
    :data:`EXACT_ROWS` rows attend in fp64, longer ones as :func:`gqa_sdpa_attention`
    (module docstring).  Same arguments and result as :func:`gqa_sdpa_attention`."""
    rows = query.shape[2]
    if attention_mask is None and rows > 1:  # the model's implicit causal mask, made explicit:
        # a prefill then computes what the tree loops' explicit-mask prefill does
        attention_mask = causal_mask(key.shape[-2] - rows, rows, query.dtype, device=query.device)
    if (key.dtype != torch.float64 or rows > EXACT_ROWS or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return gqa_sdpa_attention(module, query, key.to(query.dtype), value.to(query.dtype),
                                  attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    mask = attention_mask
    if mask is not None:
        mask = _mask_for(mask, key)
        mask = mask if mask.dtype == torch.bool else mask.double()
    out = F.scaled_dot_product_attention(query.double(), key, value, attn_mask=mask,
                                         scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
    AttentionInterface.register(EXACT_SDPA, exact_sdpa_attention)
    # Hugging Face builds no mask at all for an attention name it has no mask function for:
    # a sliding-window layer then attends causally to every row (measured on a tiny Gemma 3)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    AttentionMaskInterface.register(EXACT_SDPA, sdpa_mask)


_register()


class AttentionScope:
    """A block in which a model whose ``config`` uses ``"sdpa"`` attends through the
    attention registered as ``name``; reusable, so that a request stepped round by
    round (``spec.eagle.eagle_rounds``) enters it for each round and leaves the model
    as it found it in between."""

    def __init__(self, config, name: str):
        self.config, self.name, self.changed = config, name, []

    def __enter__(self):
        change = getattr(self.config, "_attn_implementation", None) == "sdpa"
        if change:
            self.config._attn_implementation = self.name
        self.changed.append(change)
        return self

    def __exit__(self, *exc):
        if self.changed.pop():
            self.config._attn_implementation = "sdpa"
        return False


def gqa_attention(config):
    """Within the block, a model whose ``config`` uses ``"sdpa"`` attends through
    :func:`gqa_sdpa_attention` (any other implementation is left as it is)."""
    return AttentionScope(config, GQA_SDPA)


def exact_attention(config):
    """Within the block, a model whose ``config`` uses ``"sdpa"`` attends through
    :func:`exact_sdpa_attention` (give it a ``DecodingCache(config, torch.float64)``)."""
    return AttentionScope(config, EXACT_SDPA)


def decoding_session(model, exact: bool):
    """``(cache, attention context)`` for one request's decoding loop over ``model``: a
    ``spec.cache.DecodingCache`` (rows written in place) with fp64 rows and
    :func:`exact_attention` when ``exact`` (a model that rounds activations to bf16,
    module docstring), else with the model's dtype and :func:`gqa_attention`.  A model
    compiled with ``torch.compile`` (in place or wrapped) keeps Hugging Face's
    ``DynamicCache``, whose layout its graphs were traced and guarded on."""
    if getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod"):
        return full_rows_cache(model.config), gqa_attention(model.config)
    if exact and getattr(model.config, "_attn_implementation", None) == "sdpa":
        return DecodingCache(model.config, torch.float64), exact_attention(model.config)
    return DecodingCache(model.config), gqa_attention(model.config)


def full_rows_cache(config) -> DynamicCache:
    """Hugging Face's ``DynamicCache`` for ``config`` whose sliding-window layers keep every
    row, as its full-attention layers do (module docstring)."""
    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if getattr(layer, "is_sliding", False) else layer
                    for layer in cache.layers]
    return cache


def layer_masks(config, mask: torch.Tensor, position_ids: torch.Tensor):
    """The attention mask of a loop's forward for every layer kind of ``config``.

    Parameters
    ----------
    mask : [1, 1, T, S] additive float or bool mask over the ``S - T`` cached rows (row
        ``j`` at position ``j``) and the ``T`` new tokens
    position_ids : [1, T] positions of the new tokens

    Returns
    -------
    ``mask`` itself for a model without sliding-window layers; else Hugging Face's mapping
    ``{"full_attention": mask, "sliding_attention": mask without the keys a query's
    window excludes}`` (key at position ``k`` seen from position ``q`` iff ``q - k <
    sliding_window``, as Hugging Face's own sliding masks)
    """
    kinds = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" not in kinds or window is None:
        return mask
    rows, keys = mask.shape[-2], mask.shape[-1]
    query_pos = position_ids.reshape(-1).to(mask.device)
    if query_pos.numel() != rows:
        raise ValueError(f"{query_pos.numel()} positions for a mask of {rows} query rows")
    key_pos = torch.cat([torch.arange(keys - rows, device=mask.device), query_pos])
    too_far = (query_pos[:, None] - key_pos[None, :]) >= window
    sliding = (mask & ~too_far if mask.dtype == torch.bool
               else mask.masked_fill(too_far, torch.finfo(mask.dtype).min))
    return {kind: sliding if kind == "sliding_attention" else mask for kind in kinds}
