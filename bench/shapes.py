"""The model shapes the benchmarks use (one table) and their random weights.

Large-shape latency needs no trained weights: random weights with the real shapes
move the same bytes and do the same FLOPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Shape", "SHAPES", "DTYPES", "random_weight"]


@dataclass(frozen=True)
class Shape:
    """One decoder's dimensions: LM head ``[vocab, hidden]`` and one Llama-style layer."""

    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    qkv_bias: bool = False
    tied: bool = False
    rope_theta: float = 500000.0


SHAPES = {
    "llama3-8b": Shape(128256, 4096, 32, 8, 14336),
    "qwen2-7b": Shape(152064, 3584, 28, 4, 18944, qkv_bias=True, rope_theta=1e6),
    "llama3.2-1b": Shape(128256, 2048, 32, 8, 8192, tied=True),
    "smollm2": Shape(49152, 576, 9, 3, 1536, tied=True, rope_theta=1e5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """``[rows, cols]`` fp32, uniform in ``+-1/sqrt(cols)`` (nn.Linear's init), seeded.

    Filled 16384 rows at a time, so a 128k-row head needs no second full-size buffer.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(rows, cols)
    bound = 1.0 / math.sqrt(cols)
    for start in range(0, rows, 16384):
        w[start:start + 16384].uniform_(-bound, bound, generator=gen)
    return w
