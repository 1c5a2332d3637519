"""The target's KV cache in the decoding loops: rows written in place into preallocated buffers.

Hugging Face's ``DynamicCache`` appends a forward's keys and values with ``torch.cat``,
which copies every cached row of every layer on every forward.  Measured side by side
after a 300-token prompt (``bench/bench_target_weights.py``, project's Xeon, SmolLM2 with
its int4 linears and fp64 rows for exact attention): 24.5 -> 23.3 ms for one token,
30.0 -> 29.1 ms for four, 40.0 -> 39.0 ms for eight with this cache.

:class:`DecodingCache` keeps each layer's keys and values in a buffer
``[B, kv_heads, capacity, D]`` and its ``keys`` / ``values`` as the view of the first
``length`` rows: a forward writes its rows into the buffer and returns longer
views.  The capacity doubles when full (one copy, amortised).  The loops' upkeep
works on the views: ``spec.verify.keep_path_rows`` moves accepted rows inside the
buffer and shortens the views, ``crop`` and ``spec.verify.crop_cache`` shorten them
(the latter leaves these views strided: only a compiled model needs contiguous
caches, and compiled models keep ``DynamicCache``).  Anything that replaces the views
with other tensors only costs one copy into a new buffer at the next write.  ``dtype`` stores the rows in
another dtype (fp64 for exact attention); attention then receives that dtype.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["DecodingCache", "BufferedLayer"]

MIN_CAPACITY = 512  # rows a buffer starts with (a prompt and its answer, mostly)


class BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of preallocated buffers."""

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.dtype = dtype
        self.key_buffer = self.value_buffer = None

    def _views_of_buffers(self) -> bool:
        """Whether ``keys``/``values`` are still the first rows of the buffers."""
        return (self.key_buffer is not None and self.keys.dim() == 4
                and self.keys.data_ptr() == self.key_buffer.data_ptr()
                and self.values.data_ptr() == self.value_buffer.data_ptr()
                and self.keys.stride() == self.key_buffer.stride()
                and self.values.stride() == self.value_buffer.stride())

    def _reserve(self, rows: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """Buffers of at least ``rows`` rows that hold the current keys and values."""
        if self._views_of_buffers() and self.key_buffer.shape[-2] >= rows:
            return
        length, capacity = self.get_seq_length(), max(MIN_CAPACITY, 2 * rows)
        keys = key_like.new_empty(*key_like.shape[:2], capacity, key_like.shape[-1])
        values = value_like.new_empty(*value_like.shape[:2], capacity, value_like.shape[-1])
        if length:
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        dtype = self.dtype or key_states.dtype
        key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        self._reserve(length + new, key_states, value_states)
        self.key_buffer[:, :, length:length + new] = key_states
        self.value_buffer[:, :, length:length + new] = value_states
        self.keys = self.key_buffer[:, :, :length + new]
        self.values = self.value_buffer[:, :, :length + new]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None


class DecodingCache(DynamicCache):
    """A ``DynamicCache`` whose attention layers, full and sliding-window alike, are
    :class:`BufferedLayer` (module docstring; a sliding layer's window is applied by its
    mask, ``spec.attention.layer_masks``); ``dtype``: the rows' dtype (None: the model's)."""

    def __init__(self, config, dtype: torch.dtype | None = None):
        super().__init__(config=config)
        self.layers = [BufferedLayer(dtype)
                       if type(layer) is DynamicLayer or getattr(layer, "is_sliding", False)
                       else layer for layer in self.layers]
