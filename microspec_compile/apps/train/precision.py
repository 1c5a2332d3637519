"""Whether to run training's matmuls in bf16 on this machine.

bf16 halves memory traffic and is several times faster on CPUs with native bf16
(AMX, AVX512-BF16), but CPUs without it emulate it: on a 2-core AMD EPYC with
AVX2 only, a 32-row bf16 product of a 1536 x 576 weight took 6.3 ms against
0.83 ms in fp32.  Regeneration, features and training therefore ask
:func:`bf16_is_faster` instead of assuming bf16.
"""
from __future__ import annotations

import functools
import time

import torch

__all__ = ["bf16_is_faster"]


def _median_matmul_seconds(dtype: torch.dtype, repeats: int = 9) -> float:
    x = torch.randn(32, 576, dtype=dtype, device="cpu")  # this CPU's products, by intent
    w = torch.randn(576, 1536, dtype=dtype, device="cpu")
    x @ w  # first call: kernel set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


@functools.cache
def bf16_is_faster() -> bool:
    """True where a bf16 matmul (32 x 576 x 1536, a training-sized product) beats fp32 on
    this CPU, measured once per process (a few milliseconds)."""
    with torch.no_grad():
        return _median_matmul_seconds(torch.bfloat16) < _median_matmul_seconds(torch.float32)
