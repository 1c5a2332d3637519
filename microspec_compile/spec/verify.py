"""The target's side of tree speculative decoding: one forward over the tree, cache upkeep.

The target scores the whole tree in one forward over its Hugging Face
``DynamicCache``: a 4-D additive mask ``[1, 1, T, past + T]`` (each node sees the
cached prefix and its ancestors) and explicit position ids (``past + depth``).
It returns the post-norm features (what the EAGLE head reads) and the logits of
every node.  After acceptance only the accepted path's rows are kept, selected
along the sequence dimension of every layer's keys and values.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..hf import cache_kwargs, check_cache_grew
from ..linears import needs_exact_attention
from .attention import decoding_session, layer_masks
from .cache import BufferedLayer
from .sampling import probabilities
from .stats import seconds_since
from .tree import DraftTree, accept_greedy, accept_sampling, causal_mask

__all__ = ["target_session", "check_request", "target_forward", "verify_tree",
           "verify_and_accept", "packings", "packing_for", "keep_path_rows", "crop_cache"]


def target_session(target):
    """``(cache, attention context)`` for one request over ``target``
    (``spec.attention.decoding_session``: exact fp64 attention when the target has int4
    linears, so that its verifications compute what its one-token steps do)."""
    return decoding_session(target, needs_exact_attention(target))


def check_request(input_ids: torch.Tensor, vocab_size: int, sample: bool,
                  temperature: float) -> None:
    """Clear errors for a prompt the tree loops cannot decode (batch 1, integer ids in range)
    and for a sampling temperature that is not positive."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, P] (batch 1), got {list(input_ids.shape)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0 or int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ValueError(f"input_ids must be a non-empty prompt of ids in [0, {vocab_size})")
    if sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")


def target_forward(target, ids: torch.Tensor, cache, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor,
                   logits_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [T, H], logits [T, V])`` of ``ids [1, T]`` after the cached prefix
    (``logits_rows``: the logits of the last that many rows only)."""
    base = getattr(target, target.base_model_prefix)
    dev = target.get_output_embeddings().weight.device
    cached = cache.get_seq_length()
    position_ids = position_ids.to(dev)
    masks = layer_masks(target.config, attention_mask.to(dev), position_ids)
    out = base(input_ids=ids.to(dev), attention_mask=masks, position_ids=position_ids,
               use_cache=True, **cache_kwargs(base, cache))
    check_cache_grew(cache, cached, ids.shape[1], "the target's forward")
    features = out.last_hidden_state[0]
    scored = features if logits_rows is None else features[-logits_rows:]
    return features, target.get_output_embeddings()(scored)


def prefill(target, input_ids: torch.Tensor, cache, dtype: torch.dtype = torch.float32,
            all_logits: bool = True):
    """Features ``[P, H]`` and logits of the prompt ``[1, P]`` (the cache then holds it):
    ``[P, V]``, or ``[1, V]`` for the last position only (``all_logits=False``: a loop that
    reads no prompt position's logits skips the LM head over the whole prompt)."""
    p, dev = input_ids.shape[1], input_ids.device
    return target_forward(target, input_ids, cache, torch.arange(p, device=dev).view(1, -1),
                          causal_mask(0, p, dtype, device=dev),
                          logits_rows=None if all_logits else 1)


def verify_tree(target, tree: DraftTree, cache, past: int, dtype: torch.dtype = torch.float32):
    """Score every node of ``tree`` placed after ``past`` cached tokens.

    Returns
    -------
    (features [T, H], logits [T, V]); the cache grows by ``T`` rows (see
    :func:`keep_path_rows`)
    """
    dev = target.get_output_embeddings().weight.device  # the tree is on the host, its mask not
    return target_forward(target, tree.tokens.view(1, -1), cache, tree.position_ids(past),
                          tree.attention_mask(past, dtype, device=dev))


def packings(verify_linears) -> list:
    """``verify_linears`` (one ``PackedLinears``, a sequence of them or None) as a list."""
    if verify_linears is None:
        return []
    return list(verify_linears) if isinstance(verify_linears, (list, tuple)) else [verify_linears]


def packing_for(verify_linears, rows: int):
    """The ``PackedLinears`` among ``verify_linears`` packed for ``rows``, else a no-op
    context (other row counts take the plain product)."""
    return next((p for p in packings(verify_linears) if p.rows == rows),
                contextlib.nullcontext())


def verify_and_accept(target, tree: DraftTree, cache, past: int, stats, *,
                      dtype: torch.dtype = torch.float32, verify_linears=None,
                      sample: bool = False, temperature: float = 1.0, generator=None):
    """One round's verification of ``tree`` (timed into ``stats.target_times``) and its
    acceptance: greedy, or multi-candidate speculative sampling at ``temperature``.

    Returns
    -------
    (features [T, H], logits [T, V], path: accepted node indices from the root, emitted
    tokens: the accepted ones and the bonus token)
    """
    t = time.perf_counter()
    with packing_for(verify_linears, len(tree)):
        features, logits = verify_tree(target, tree, cache, past, dtype)
    stats.target_times.append(seconds_since(t, logits.device))  # acceptance syncs anyway
    if sample:
        probs = probabilities(logits, temperature).cpu()
        path, bonus = accept_sampling(tree, probs, generator)
    else:
        path, bonus = accept_greedy(tree, logits.argmax(-1).cpu())
    return features, logits, path, tree.tokens[path[1:]].tolist() + [bonus]


def keep_path_rows(cache, past: int, path: list[int]) -> None:
    """Keep the ``past`` cached rows and the accepted tree rows ``past + path``, in that order.

    ``path`` holds increasing tree indices from the root (``path[0] == 0``, so
    ``path[i] >= i``).  Rows already in place stay; the few others are copied down
    into place, then every layer is cut to ``past + len(path)`` rows as a view: no
    copy of the cached prefix (an ``index_select`` of all rows cost a full copy per
    round; a ``spec.cache.DecodingCache`` then writes the next rows after the view).
    """
    moved = [i for i, p in enumerate(path) if p != i]
    dst = torch.tensor([past + i for i in moved], dtype=torch.int64, device="cpu")
    src = torch.tensor([past + path[i] for i in moved], dtype=torch.int64, device="cpu")
    length, on_device = past + len(path), {}  # device -> (dst, src): one copy, not one per layer
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None:
            continue
        if moved:
            dev = layer.keys.device
            if dev not in on_device:
                on_device[dev] = dst.to(dev), src.to(dev)
            d, s = on_device[dev]
            layer.keys[:, :, d] = layer.keys[:, :, s]  # the gathered rows are a copy: safe
            layer.values[:, :, d] = layer.values[:, :, s]
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def crop_cache(cache, length: int) -> None:
    """Drop cached positions past ``length``, keeping the cache contiguous.

    A compiled model guards on the strides of its inputs.  ``DynamicCache``
    keeps the prefill's keys as a transposed view and ``crop`` leaves strided
    views behind: each layout would be a recompile (measured: one per crop
    amount, one for the first decode step).  Copying the kept part costs about
    as much as reading it once, well under a millisecond here.
    """
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
    for layer in cache.layers:
        if isinstance(layer, BufferedLayer):  # views of its buffers, never fed to a compiled graph
            continue
        if getattr(layer, "keys", None) is not None and not layer.keys.is_contiguous():
            layer.keys = layer.keys.contiguous()
            layer.values = layer.values.contiguous()
