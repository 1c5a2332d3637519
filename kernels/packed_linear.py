"""MKL-prepacked fp32 linears for a fixed small row count: the target's tree verification on CPU.

A tree verification multiplies every weight of the target by a handful of rows
(``T`` = the tree's size, 4-16).  At such ``T`` a plain fp32 ``F.linear`` on CPU
repacks the whole weight on every call, and the call costs 2-3x the one-row
product although the arithmetic is tiny.  MKL can pack a weight once for a given
``T`` (``cblas_sgemm_pack``, exposed as ``torch.ops.mkl._mkl_reorder_linear_weight``
and ``torch.ops.mkl._mkl_linear``, the ops Inductor's CPU freezing uses); the
packed product then costs little more than the one-row product.

``PackedLinears(model, rows)`` packs every fp32 CPU ``nn.Linear`` of ``model``
once; inside ``with packed:`` those modules compute through the packed weight.
Inputs of another row count take MKL's ordinary path, bit for bit ``F.linear``
(``_mkl_linear`` falls back by itself), so prefill and single-token steps are
unchanged.  The packed product rounds differently from ``F.linear`` at ``rows``
(about 1e-7 relative, like any change of GEMM blocking).  Where MKL is missing
(e.g. an ARM build) or a weight is not fp32 on CPU the module is left as it is,
and a call that autograd records takes ``F.linear`` (the packed op has no gradient).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinears", "mkl_packing_available"]


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed fp32 GEMM."""
    return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl,
                                                               "_mkl_reorder_linear_weight")


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and w is not None and w.device.type == "cpu"
            and w.dtype == torch.float32)


class PackedLinears:
    """The fp32 CPU linears of ``model`` packed for ``rows`` input rows (module docstring).

    Parameters
    ----------
    model : any module; its ``nn.Linear`` children with fp32 CPU weights are packed
    rows : the row count (product of the input's leading dims) the packing serves

    Attributes
    ----------
    count : how many linears were packed (0 without MKL)

    Notes
    -----
    The packed copies are taken at construction: build a new ``PackedLinears``
    after changing the model's weights.  They take as much memory as the weights.
    """

    def __init__(self, model: nn.Module, rows: int):
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        self.rows = rows
        self._forwards: list[tuple[nn.Module, object]] = []
        if not mkl_packing_available():
            return
        with torch.no_grad():
            for module in model.modules():
                if _packable(module):
                    self._forwards.append((module, self._packed_forward(module)))

    @property
    def count(self) -> int:
        return len(self._forwards)

    def _packed_forward(self, module: nn.Linear):
        weight, bias, rows = module.weight, module.bias, self.rows
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if (x.dtype != torch.float32 or x.device.type != "cpu"
                    or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
                return nn.functional.linear(x, weight, bias)  # MKL's op has no autograd
            return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)

        return forward

    def __enter__(self) -> "PackedLinears":
        for module, forward in self._forwards:
            module.forward = forward  # an instance attribute shadows nn.Linear.forward
        return self

    def __exit__(self, *exc) -> None:
        for module, _ in self._forwards:
            module.__dict__.pop("forward", None)
