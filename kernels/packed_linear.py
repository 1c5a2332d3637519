"""Prepacked fp32 linears for a fixed small row count: the target's tree verification on CPU.

A tree verification multiplies every weight of the target by a handful of rows
(``T`` = the tree's size, 4-16).  At such ``T`` a plain fp32 ``F.linear`` on CPU
repacks the whole weight on every call, and the call costs 2-3x the one-row
product although the arithmetic is tiny.  MKL can pack a weight once for a given
``T`` (``cblas_sgemm_pack``, exposed as ``torch.ops.mkl._mkl_reorder_linear_weight``
and ``torch.ops.mkl._mkl_linear``, the ops Inductor's CPU freezing uses); the
packed product then costs little more than the one-row product.

oneDNN packs a weight for a batch size too (``torch.ops.mkldnn._reorder_linear_weight``
and ``_linear_pointwise``, what Inductor's CPU freezing uses without MKL).  Which of
the two is faster depends on the CPU (measured here: on an AMD EPYC with AVX2 only,
oneDNN's 8-row products of SmolLM2's 30 layers took 54 ms against MKL's 64.5 ms;
MKL is known to favour Intel CPUs), so ``PackedLinears`` times both on the model's
largest weight at construction and keeps the faster (:func:`choose_kernel`).

``PackedLinears(model, rows)`` packs every fp32 CPU ``nn.Linear`` of ``model``
once; inside ``with packed:`` those modules compute through the packed weight.
Inputs of another row count take ``F.linear`` (MKL's op falls back by itself, bit
for bit), so prefill and single-token steps are unchanged.  The packed product
rounds differently from ``F.linear`` at ``rows`` (about 1e-7 relative, like any
change of GEMM blocking).  Where neither library is there (e.g. an ARM build) or a
weight is not fp32 on CPU the module is left as it is, and a call that autograd
records takes ``F.linear`` (the packed ops have no gradient).
"""
from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["KERNELS", "PackedLinears", "choose_kernel", "mkl_packing_available",
           "onednn_packing_available"]


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed fp32 GEMM."""
    return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl,
                                                               "_mkl_reorder_linear_weight")


def onednn_packing_available() -> bool:
    """Whether this torch build has oneDNN's packed fp32 linear."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn,
                                                                  "_linear_pointwise")


def _mkl_pack(weight: torch.Tensor, bias, rows: int):
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def _onednn_pack(weight: torch.Tensor, bias, rows: int):
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def product(x: torch.Tensor) -> torch.Tensor:
        if x.numel() != rows * weight.shape[1]:  # another row count: the ordinary product
            return nn.functional.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return product


# name -> (available, pack(weight, bias, rows) -> product(x)); fastest chosen per CPU
KERNELS = {"mkl": (mkl_packing_available, _mkl_pack),
           "onednn": (onednn_packing_available, _onednn_pack)}


def choose_kernel(weight: torch.Tensor, rows: int, repeats: int = 20) -> str | None:
    """The faster packing on this CPU for ``rows`` rows times ``weight`` (median of
    ``repeats`` timed products each); None where no packing is available."""
    names = [name for name, (available, _) in KERNELS.items() if available()]
    if len(names) < 2:
        return names[0] if names else None
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    medians = {}
    with torch.no_grad():
        for name in names:
            product = KERNELS[name][1](weight, None, rows)
            product(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                product(x)
                times.append(time.perf_counter() - start)
            medians[name] = sorted(times)[repeats // 2]
    return min(medians, key=medians.get)


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and w is not None and w.device.type == "cpu"
            and w.dtype == torch.float32)


def _heaviest_shape_weight(modules: list[nn.Module]) -> torch.Tensor:
    """A weight of the shape that holds the most elements over ``modules`` (where the time goes)."""
    totals: dict[tuple, int] = {}
    for m in modules:
        totals[tuple(m.weight.shape)] = totals.get(tuple(m.weight.shape), 0) + m.weight.numel()
    shape = max(totals, key=totals.get)
    return next(m.weight for m in modules if tuple(m.weight.shape) == shape).detach()


class PackedLinears:
    """The fp32 CPU linears of ``model`` packed for ``rows`` input rows (module docstring).

    Parameters
    ----------
    model : any module; its ``nn.Linear`` children with fp32 CPU weights are packed
    rows : the row count (product of the input's leading dims) the packing serves
    kernel : a name in :data:`KERNELS`, or None: the faster on this CPU
        (:func:`choose_kernel` on the weight shape that holds most of the elements)

    Attributes
    ----------
    count : how many linears were packed (0 without MKL and oneDNN)
    kernel : the packing used, or None

    Notes
    -----
    The packed copies are taken at construction: build a new ``PackedLinears``
    after changing the model's weights.  They take as much memory as the weights.
    """

    def __init__(self, model: nn.Module, rows: int, kernel: str | None = None):
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {sorted(KERNELS)}")
        self.rows = rows
        self._forwards: list[tuple[nn.Module, object]] = []
        modules = [m for m in model.modules() if _packable(m)]
        if kernel is None and modules:
            kernel = choose_kernel(_heaviest_shape_weight(modules), rows)
        elif kernel is not None and not KERNELS[kernel][0]():
            kernel = None  # that library is not in this build: nothing is packed
        self.kernel = kernel if modules else None
        if self.kernel is None:
            return
        with torch.no_grad():
            for module in modules:
                self._forwards.append((module, self._packed_forward(module)))

    @property
    def count(self) -> int:
        return len(self._forwards)

    def _packed_forward(self, module: nn.Linear):
        weight, bias = module.weight, module.bias
        product = KERNELS[self.kernel][1](weight.detach(), bias, self.rows)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if (x.dtype != torch.float32 or x.device.type != "cpu"
                    or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
                return nn.functional.linear(x, weight, bias)  # the packed ops have no autograd
            return product(x)

        return forward

    def __enter__(self) -> "PackedLinears":
        for module, forward in self._forwards:
            module.forward = forward  # an instance attribute shadows nn.Linear.forward
        return self

    def __exit__(self, *exc) -> None:
        for module, _ in self._forwards:
            module.__dict__.pop("forward", None)
