"""Pick the implementation of each op: ``impl`` is ``"auto"``, ``"torch"`` or ``"triton"``.

``"torch"`` runs pure torch: on CPU the paths of ``cpu_head`` (the live-rows
head and the already-active observe shortcut; a host read is free there), elsewhere the references (no host syncs, so valid and
capturable on CUDA). ``"triton"`` runs the Triton kernels. ``"auto"`` takes Triton
on CUDA when it imports, torch elsewhere.
"""
from __future__ import annotations

from .cpu_head import observe_cpu, sparse_full_cpu, sparse_topk_cpu
from .reference import observe_reference, sparse_full_reference, sparse_topk_reference

IMPLS = ("auto", "torch", "triton")


def _use_triton(device, impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        return True
    return device.type == "cuda" and triton_available()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def observe(rows, ids, member, last_seen, count, step, weight, tokens, pin, impl="auto"):
    if _use_triton(rows.device, impl):
        from .triton_observe import observe_triton

        return observe_triton(rows, ids, member, last_seen, count, step, weight, tokens, pin)
    if rows.device.type == "cpu":
        return observe_cpu(rows, ids, member, last_seen, count, step, weight, tokens, pin)
    observe_reference(rows, ids, member, last_seen, count, step, weight, tokens, pin)


def sparse_topk(hidden, rows, ids, count, bias, k, normalize, impl="auto"):
    if _use_triton(hidden.device, impl):
        from .triton_sparse_head import sparse_topk_triton

        return sparse_topk_triton(hidden, rows, ids, count, bias, k, normalize)
    if hidden.device.type == "cpu":
        return sparse_topk_cpu(hidden, rows, ids, count, bias, k, normalize)
    return sparse_topk_reference(hidden, rows, ids, count, bias, k, normalize)


def sparse_full(hidden, rows, ids, count, bias, vocab_size, normalize, impl="auto"):
    if _use_triton(hidden.device, impl):
        from .triton_sparse_head import sparse_full_triton

        return sparse_full_triton(hidden, rows, ids, count, bias, vocab_size, normalize)
    if hidden.device.type == "cpu":
        return sparse_full_cpu(hidden, rows, ids, count, bias, vocab_size, normalize)
    return sparse_full_reference(hidden, rows, ids, count, bias, vocab_size, normalize)
