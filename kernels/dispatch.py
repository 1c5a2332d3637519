"""The one place that chooses a kernel: the user's ``path``, the ops' ``impl``, the device.

Three kernel families implement each op (``observe``, ``sparse_topk``, ``sparse_full``):

``"triton"``     ``triton_observe`` / ``triton_sparse_head`` (CUDA; CPU tensors under
                 ``TRITON_INTERPRET=1``, as the tests run them);
``"cpu"``        ``cpu_head``: value-dependent shortcuts, a host read is free on CPU;
``"reference"``  ``reference``: capturable (no host sync), the fallback elsewhere.

The registered ops take an ``impl`` string (``IMPLS``): ``"torch"`` runs pure torch
(``cpu`` on CPU, ``reference`` elsewhere), ``"triton"`` the Triton kernels, ``"auto"``
Triton on CUDA when it imports and torch elsewhere. :func:`kernel_family` is the only
code that applies that rule and :func:`kernel` the only table lookup.

``MicrospecConfig.path`` (``PATHS``) adds ``"inductor"``: the head ops are decomposed
into aten (``inductor_head.decompositions``) when the graph is compiled, so no kernel
of the table runs for them; the ops in the graph then get ``impl="auto"``.
:func:`op_impl` is the only translation from a path to an ``impl`` and
:func:`decomposes` says whether a path compiles through the decomposition table.

Why not ``torch.library.register_kernel(op, "cpu" / "cuda")``: it keys on the device
only, while the ops must also honour an explicit choice on one device (the Triton
interpreter on CPU tensors in the tests, the capturable reference on CUDA in the
benchmarks). A per-device registration plus an override would be two mechanisms;
one table keyed by family, with one rule, is one.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

IMPLS = ("auto", "torch", "triton")
PATHS = ("auto", "torch", "inductor", "triton")

# family -> op -> (module of this package, function name)
_FAMILIES = {
    "triton": {"observe": ("triton_observe", "observe_triton"),
               "sparse_topk": ("triton_sparse_head", "sparse_topk_triton"),
               "sparse_full": ("triton_sparse_head", "sparse_full_triton")},
    "cpu": {"observe": ("cpu_head", "observe_cpu"),
            "sparse_topk": ("cpu_head", "sparse_topk_cpu"),
            "sparse_full": ("cpu_head", "sparse_full_cpu")},
    "reference": {"observe": ("reference", "observe_reference"),
                  "sparse_topk": ("reference", "sparse_topk_reference"),
                  "sparse_full": ("reference", "sparse_full_reference")},
}


def triton_available() -> bool:
    """Whether ``triton`` imports (the Triton kernels are imported lazily)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_family(device: torch.device, impl: str = "auto") -> str:
    """``"triton"``, ``"cpu"`` or ``"reference"`` for an op on ``device`` given ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" or (impl == "auto" and device.type == "cuda" and triton_available()):
        return "triton"
    return "cpu" if device.type == "cpu" else "reference"


def kernel(op: str, device: torch.device, impl: str = "auto") -> Callable:
    """The function implementing ``op`` (``"observe"``, ``"sparse_topk"`` or
    ``"sparse_full"``) on ``device`` for ``impl``.

    Returns
    -------
    callable
        ``observe``: ``fn(state, weight, tokens, pin)``; ``sparse_topk``:
        ``fn(hidden [N, H], rows, ids, count, bias, k, normalize)``; ``sparse_full``:
        ``fn(hidden [N, H], rows, ids, count, bias, vocab_size, normalize)``.
    """
    module, name = _FAMILIES[kernel_family(device, impl)][op]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def check_path(path: str) -> str:
    """``path`` if it is one of ``PATHS``, else a ValueError naming the choices."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {' / '.join(PATHS)}, got {path!r}")
    return path


def op_impl(path: str) -> str:
    """The ``impl`` argument the rewritten ops get for ``MicrospecConfig.path``."""
    return check_path(path) if path in IMPLS else "auto"


def decomposes(path: str) -> bool:
    """Whether ``path`` compiles the head ops through ``inductor_head.decompositions``."""
    return check_path(path) == "inductor"
