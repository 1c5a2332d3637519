"""Prepacked fp32 linears for a fixed small row count: the target's tree verification on CPU.

A tree verification multiplies every weight of the target by a handful of rows
(``T`` = the tree's size, 4-16).  At such ``T`` a plain fp32 ``F.linear`` on CPU
repacks the whole weight on every call, and the call costs 2-3x the one-row
product although the arithmetic is tiny.  MKL can pack a weight once for a given
``T`` (``cblas_sgemm_pack``, exposed as ``torch.ops.mkl._mkl_reorder_linear_weight``
and ``torch.ops.mkl._mkl_linear``, the ops Inductor's CPU freezing uses); the
packed product then costs little more than the one-row product.

oneDNN packs a weight for a batch size too (``torch.ops.mkldnn._reorder_linear_weight``
and ``_linear_pointwise``, what Inductor's CPU freezing uses without MKL), and for a
few rows the unpacked transposed product ``(W @ x^T)^T`` can beat both.  Which is
fastest depends on the CPU and the weight's shape (measured on an AMD EPYC with AVX2
only, 4 rows, SmolLM2's weights summed over the model: 576 x 576 MKL 10.1 / oneDNN
8.8 / transposed 7.7 ms, 192 x 576 2.8 / 3.9 / 3.0 ms, the 49152 x 576 LM head 14.3 /
9.0 / 10.0 ms; MKL is known to favour Intel CPUs), so ``PackedLinears`` times each
kernel on the weights of every shape at construction (all of them, so that they
stream from memory as in the model; one weight alone would sit in the cache) and
keeps the fastest (:data:`KERNELS`; :func:`choose_kernel` for one weight).

``PackedLinears(model, rows)`` packs every fp32 CPU ``nn.Linear`` of ``model``
once; inside ``with packed:`` those modules compute through the packed weight.
Inputs of another row count take ``F.linear`` (MKL's op falls back by itself, bit
for bit), so prefill and single-token steps are unchanged.  The packed product
rounds differently from ``F.linear`` at ``rows`` (about 1e-7 relative, like any
change of GEMM blocking).  A weight that is not fp32 on CPU is left as it is, and a
call that autograd records takes ``F.linear`` (the packed ops have no gradient).
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


def _transposed(weight: torch.Tensor, bias, rows: int):
    """No packing: ``(W @ x^T)^T``, which streams ``W`` once."""

    def product(x: torch.Tensor) -> torch.Tensor:
        if x.numel() != rows * weight.shape[1]:  # another row count: the ordinary product
            return nn.functional.linear(x, weight, bias)
        out = torch.mm(weight, x.reshape(rows, -1).t()).t()
        out = out + bias if bias is not None else out
        return out.reshape(*x.shape[:-1], weight.shape[0]).contiguous()

    return product


def _always() -> bool:
    return True


# name -> (available, pack(weight, bias, rows) -> product(x)); the fastest is chosen per shape
KERNELS = {"mkl": (mkl_packing_available, _mkl_pack),
           "onednn": (onednn_packing_available, _onednn_pack),
           "transposed": (_always, _transposed)}


def _fastest(weights: list[torch.Tensor], biases: list, rows: int, names: list[str],
             repeats: int) -> tuple[str, list]:
    """Of ``names``, the kernel whose products of ``rows`` rows through all of ``weights`` (one
    shape; the whole group streams from memory as in the model) take the least time (the
    lower quartile of ``repeats`` passes, the kernels interleaved); returns it with its
    products."""
    candidates = {name: [KERNELS[name][1](w, b, rows) for w, b in zip(weights, biases)]
                  for name in names}
    if len(candidates) == 1:
        return next(iter(candidates.items()))
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    for products in candidates.values():
        for product in products:
            product(x)  # first calls: kernel set-up
    # the kernels take turns, in an order reversed every pass, so that a slow spell of the
    # machine hits them alike; the lower quartile of each kernel's passes is its time
    times = {name: [] for name in candidates}
    order = list(candidates)
    for turn in range(repeats):
        for name in order if turn % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for product in candidates[name]:
                product(x)
            times[name].append(time.perf_counter() - start)
    quartile = {name: sorted(t)[len(t) // 4] for name, t in times.items()}
    best = min(quartile, key=quartile.get)
    return best, candidates[best]


def _available() -> list[str]:
    return [name for name, (available, _) in KERNELS.items() if available()]


def choose_kernel(weight: torch.Tensor, rows: int, repeats: int = 9) -> str | None:
    """The fastest kernel on this CPU for ``rows`` rows times ``weight`` (the lower quartile
    of ``repeats`` timed calls each); None where no kernel is available."""
    names = _available()
    if not names:
        return None
    with torch.no_grad():
        return _fastest([weight], [None], rows, names, repeats)[0]


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and w is not None and w.device.type == "cpu"
            and w.dtype == torch.float32)


# (weight shape, modules of that shape, rows) -> the kernel measured fastest in this process
_CHOSEN: dict[tuple, str] = {}


def _by_shape(modules: list[nn.Module]) -> dict[tuple[int, int], list[nn.Module]]:
    groups: dict[tuple[int, int], list[nn.Module]] = {}
    for m in modules:
        groups.setdefault(tuple(m.weight.shape), []).append(m)
    return groups


class PackedLinears:
    """The fp32 CPU linears of ``model`` packed for ``rows`` input rows (module docstring).

    Parameters
    ----------
    model : any module; its ``nn.Linear`` children with fp32 CPU weights are packed
    rows : the row count (product of the input's leading dims) the packing serves
    kernel : a name in :data:`KERNELS` for every weight, or None: per weight shape, the
        fastest on this CPU, timed over all the model's weights of that shape (2-3 s for
        SmolLM2-135M; once per process and shape, later packings reuse the choice)

    Attributes
    ----------
    count : how many linears were packed
    kernels : ``{(out, in): kernel name}`` per packed weight shape
    kernel : the kernel of the shape that holds the most weight elements, or None

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
        self.kernels: dict[tuple[int, int], str] = {}
        groups = _by_shape([m for m in model.modules() if _packable(m)])
        names = _available() if kernel is None else [kernel] if KERNELS[kernel][0]() else []
        with torch.no_grad():
            for shape, group in groups.items() if names else ():
                # the choice depends on the CPU and the shapes, not on the weights' values:
                # timed once per process, so repacking (e.g. per request) costs the packing only
                key = (shape, len(group), rows)
                chosen = [_CHOSEN[key]] if kernel is None and key in _CHOSEN else names
                name, products = _fastest([m.weight.detach() for m in group],
                                          [m.bias for m in group], rows, chosen, repeats=9)
                if kernel is None:
                    _CHOSEN[key] = name
                self.kernels[shape] = name
                self._forwards += [(m, self._guarded(m, product))
                                   for m, product in zip(group, products)]
        heaviest = max(self.kernels, key=lambda shape: shape[0] * shape[1] * len(groups[shape]),
                       default=None)
        self.kernel = self.kernels.get(heaviest)

    @property
    def count(self) -> int:
        return len(self._forwards)

    @staticmethod
    def _guarded(module: nn.Linear, product):
        weight, bias = module.weight, module.bias

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
