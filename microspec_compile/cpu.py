"""The CPU's feature flags: which kernels a CPU runs fast (read once per process)."""
from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["SIMD_FLAGS", "cpu_flags"]

#: The CPU flags that decide which kernels run (recorded with every detailed result).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read); read once
    per process (``policy.prompt_top_ids`` asks on every request)."""
    try:
        line = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())
