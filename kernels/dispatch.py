"""The one place that chooses a kernel: from the ``path`` (``PATHS``) and the device.

``path`` is one setting with one name, from the user to the kernel: ``MicrospecConfig.path``,
the argument of every ``microspec::`` op (the rewrite passes it on), and here:

``"auto"``      Triton on CUDA when it imports, pure torch elsewhere;
``"torch"``     pure torch: the CPU kernels on CPU, the capturable references elsewhere;
``"triton"``    the Triton kernels (CPU tensors under ``TRITON_INTERPRET=1``, as the tests);
``"inductor"``  the head ops are decomposed into aten (``inductor_head.decompositions``)
                when the graph compiles, so no kernel of the table runs for them; an op
                that still runs (``observe``, or a graph compiled without Inductor) runs
                as ``"auto"``.

A path resolves, per device, to one of three sets of kernels (:data:`KERNELS`), each
implementing every op (``observe``, ``sparse_topk``, ``sparse_full``):

``"triton"``     ``triton_observe`` / ``triton_sparse_head``;
``"cpu"``        ``cpu_head``: value-dependent shortcuts, a host read is free on CPU;
``"reference"``  ``reference``: capturable (no host sync).

:func:`kernels_for` is the only code that applies that rule, :func:`kernel` the only
table lookup and :func:`decomposes` says whether a path compiles through the
decomposition table.

Why not ``torch.library.register_kernel(op, "cpu" / "cuda")``: it keys on the device
only, while the ops must also honour an explicit choice on one device (the Triton
interpreter on CPU tensors in the tests, the capturable reference on CUDA in the
benchmarks). A per-device registration plus an override would be two mechanisms;
one table with one rule is one.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

PATHS = ("auto", "torch", "inductor", "triton")

#: kernel set -> op -> (module of this package, function name)
KERNELS = {
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


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports (the Triton kernels are imported lazily; asked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_for(device: torch.device, path: str = "auto") -> str:
    """The kernel set (``"triton"``, ``"cpu"`` or ``"reference"``) that runs an op on
    ``device`` for ``path``."""
    return _kernel_set(device.type, check_path(path))


@functools.cache
def _kernel_set(device_type: str, path: str) -> str:
    if path == "triton" or (path in ("auto", "inductor") and device_type == "cuda"
                            and triton_available()):
        return "triton"
    return "cpu" if device_type == "cpu" else "reference"


def kernel(op: str, device: torch.device, path: str = "auto") -> Callable:
    """The function implementing ``op`` (``"observe"``, ``"sparse_topk"`` or
    ``"sparse_full"``) on ``device`` for ``path``.

    Returns
    -------
    callable
        ``observe``: ``fn(state, weight, tokens, pin)``; ``sparse_topk``:
        ``fn(hidden [N, H], rows, ids, count, bias, k, normalize)``; ``sparse_full``:
        ``fn(hidden [N, H], rows, ids, count, bias, vocab_size, normalize)``.
    """
    return _kernel(op, device.type, check_path(path))


@functools.cache  # the ops ask on every call: one dictionary lookup, no import machinery
def _kernel(op: str, device_type: str, path: str) -> Callable:
    module, name = KERNELS[_kernel_set(device_type, path)][op]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def check_path(path: str) -> str:
    """``path`` if it is one of ``PATHS``, else a ValueError naming the choices."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {' / '.join(PATHS)}, got {path!r}")
    return path


def decomposes(path: str) -> bool:
    """Whether ``path`` compiles the head ops through ``inductor_head.decompositions``."""
    return check_path(path) == "inductor"
