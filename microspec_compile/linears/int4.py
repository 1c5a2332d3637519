"""4-bit weight-only linears for a target whose weights are 4-bit groups (GGUF ``Q4_0``/``Q4_1``).

Why: the project's default target is SmolLM2-135M-Instruct as a ``Q4_1`` GGUF. Its
decoder linears are 4-bit integers in groups of 32 along the input dimension, each
group with its own scale and minimum: ``w = q * scale + minimum``, ``q`` in 0..15.
Loaded through transformers they become fp32, so every target step streams 425 MB
of fp32 weights that hold 53 MB of information.  torch's CPU weight-only kernel
(``torch._weight_int4pack_mm_for_cpu``, what gpt-fast and torchao run for int4) reads
the 4-bit codes directly.  Measured on the project's 2-core Xeon (AMX, torch 2.13,
2 threads), SmolLM2's 210 decoder linears called one after the other, the two sides
interleaved in one process, medians:

==== ============== ========================
rows fp32 F.linear  Int4Linear (bf16 inputs)
==== ============== ========================
1    18.5 ms        8.6 ms
4    29.0 ms        11.4 ms
8    33.8 ms        17.0 ms
==== ============== ========================

(The kernel alone, in a separate run on random weights of these shapes: 4.9, 7.1 and
12.8 ms; it takes rows in blocks of 4.  fp32 inputs take a reference path in that kernel:
96 ms for one row, so the module feeds it bf16.)

The kernel computes ``x_bf16 @ ((q - 8) * s + z)^T`` with fp32 accumulation and a bf16
output, where ``s`` and ``z = minimum + 8 * scale``
are the group's scale and zero in bf16; it computes every row the same way
whatever the number of rows (tested), so a tree verification and a one-token step
agree bit for bit, as greedy speculative decoding needs.

:func:`int4_groups` recovers ``(q, scale, minimum)`` from an fp32 weight only when
the weight *is* exactly such groups (a dequantized checkpoint): nothing is
quantized here, and any other weight is left as it is.  The numbers differ from
the fp32 model's by the bf16 rounding of the inputs, the output and the group
scales (about 0.4% relative), like running the model in bf16.

The kernel's time grows with the rows (380 ms for a 300-token prompt over random
weights of the same 210 shapes), so calls of more than :data:`PREFILL_ROWS` rows (a prompt's prefill)
take a bf16 copy of the dequantized weight through ``F.linear`` instead (66 ms
there; 23 vs 22 ms at 16 rows, 42 vs 23 ms at 32).  That copy rounds differently
from the kernel: a tree of more than ``PREFILL_ROWS`` tokens would not be computed
bit for bit like one-token steps.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GROUP_SIZE", "PREFILL_ROWS", "Int4Groups", "Int4Linear", "int4_groups",
           "int4_kernel_available", "int4_linear_reference", "quantize_exact_int4",
           "count_int4_linears", "int4_is_faster"]

GROUP_SIZE = 32  # GGUF's Q4_0 / Q4_1 block along the input dimension
_INNER_K_TILES = 2  # the packing's tile parameter; 2, 4 and 8 measured alike on CPU
PREFILL_ROWS = 24  # more rows: the bf16 copy's F.linear (see the module docstring)


def int4_kernel_available() -> bool:
    """Whether this torch build has the CPU int4 weight-only kernel."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu")


@dataclass
class Int4Groups:
    """A weight ``[N, K]`` as 4-bit groups: ``w[n, g*G + j] = q[n, g*G + j] * scale[n, g] +
    minimum[n, g]``.

    Attributes
    ----------
    codes : [N, K] int32 in 0..15
    scale, minimum : [N, K // G] fp32
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` the groups stand for."""
        n, k = self.codes.shape
        g = self.codes.view(n, self.scale.shape[1], -1).float()
        return (g * self.scale[..., None] + self.minimum[..., None]).view(n, k)

    def kernel_weight(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` the kernel multiplies by: ``(q - 8) * scale + zero``
        with the bf16 scale and zero of :meth:`kernel_scales_and_zeros`."""
        sz = self.kernel_scales_and_zeros().float()          # [K/G, N, 2]
        n, k = self.codes.shape
        codes = self.codes.view(n, sz.shape[0], -1).float()
        return ((codes - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(n, k)

    def kernel_scales_and_zeros(self) -> torch.Tensor:
        """``[K // G, N, 2]`` bf16: the kernel's ``(scale, zero)`` per group, where it computes
        ``(q - 8) * scale + zero`` (so ``zero = minimum + 8 * scale``)."""
        zero = self.minimum + 8 * self.scale
        return torch.stack([self.scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()


def int4_groups(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Groups | None:
    """The exact 4-bit groups of an fp32 weight ``[N, K]``, or None when it is not one.

    A dequantized ``Q4_1`` block has its minimum at code 0 and its maximum at code 15
    (that is how the quantizer chose them), so ``minimum`` and ``scale = (max - min) / 15``
    are read off each group; the weight qualifies only if ``codes * scale + minimum``
    rebuilds it bit for bit.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % group_size:
        return None
    n, k = weight.shape
    g = weight.detach().reshape(n, k // group_size, group_size)
    low, high = g.amin(-1), g.amax(-1)
    scale = (high - low) / 15
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - low[..., None]) / step[..., None]).clamp_(0, 15)
    groups = Int4Groups(codes.to(torch.int32).view(n, k), scale, low)
    return groups if torch.equal(groups.dequantize(), weight.detach()) else None


def int4_linear_reference(x: torch.Tensor, groups: Int4Groups, bias=None) -> torch.Tensor:
    """Pure-torch equivalent of :class:`Int4Linear` (the kernel's roundings, fp32 sums)."""
    y = (x.to(torch.bfloat16).float() @ groups.kernel_weight().t()).to(torch.bfloat16).to(x.dtype)
    return y if bias is None else y + bias


class Int4Linear(nn.Module):
    """``nn.Linear`` over packed 4-bit groups (CPU; inputs computed in bf16, module docstring;
    a prefill of more than ``PREFILL_ROWS`` rows through a bf16 copy of the weight).

    Build with :meth:`from_linear` (None when the weight is not exact 4-bit groups).
    ``x [..., K]`` of any float dtype gives ``[..., N]`` of that dtype.
    """

    def __init__(self, groups: Int4Groups, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = groups.codes.shape
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(
            groups.codes, _INNER_K_TILES))
        self.register_buffer("scales_and_zeros", groups.kernel_scales_and_zeros())
        self.register_buffer("prefill_weight", groups.kernel_weight().to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear | None":
        if linear.weight.device.type != "cpu":
            return None
        groups = int4_groups(linear.weight)
        return None if groups is None else cls(groups, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"Int4Linear takes float inputs, got dtype {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"Int4Linear runs on CPU (its kernel is CPU-only); the input is on "
                             f"{x.device}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int4Linear expects inputs [..., {self.in_features}], got "
                             f"{list(x.shape)}")
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] > PREFILL_ROWS:
            y = F.linear(rows, self.prefill_weight).to(x.dtype)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP_SIZE,
                                                  self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={GROUP_SIZE}, bias={self.bias is not None}")


def int4_is_faster(linears: list[nn.Module], int4_linears: list[nn.Module],
                   repeats: int = 5) -> bool:
    """Whether one-row products through ``int4_linears`` take less time than through the
    fp32 ``linears`` they stand for (one shape) on this CPU: medians of ``repeats`` passes
    over all of them, so that the weights stream from memory as in the model.  (On the
    project's Xeon with AMX the int4 side is several times faster, see the module
    docstring; a CPU without fast bf16 may differ, and ``quantize_exact_int4(check_speed=
    True)`` asks.)"""
    if not linears:
        return False
    x = torch.randn(1, linears[0].in_features)
    medians = []
    for modules in (linears, int4_linears):
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first pass sets kernels up
                start = time.perf_counter()
                for module in modules:
                    module(x)
                times.append(time.perf_counter() - start)
        medians.append(sorted(times[1:])[repeats // 2])
    return medians[1] < medians[0]


def quantize_exact_int4(model: nn.Module, check_speed: bool = False) -> int:
    """Replace every CPU ``nn.Linear`` of ``model`` whose fp32 weight is exact 4-bit groups
    by an :class:`Int4Linear`; returns how many were replaced (0: none qualified).

    The output embeddings (the LM head) stay as they are: a draft's head (dense,
    FR-Spec or microspec's sparse one) reads their rows.  ``check_speed``: replace them
    only if :func:`int4_is_faster` on the most common shape among them (else 0).
    """
    if not int4_kernel_available():
        raise RuntimeError("this torch build has no CPU int4 weight-only kernel "
                           "(torch._weight_int4pack_mm_for_cpu); keep the fp32 weights")
    get_head = getattr(model, "get_output_embeddings", None)
    lm_head = get_head() if get_head is not None else None
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not lm_head:
                new = Int4Linear.from_linear(child)
                if new is not None:
                    swaps.append((parent, name, child, new))
    if check_speed and swaps:
        shape = Counter(child.weight.shape for _, _, child, _ in swaps).most_common(1)[0][0]
        timed = [(child, new) for _, _, child, new in swaps if child.weight.shape == shape]
        if not int4_is_faster([c for c, _ in timed], [n for _, n in timed]):
            return 0
    for parent, name, _, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def count_int4_linears(model: nn.Module) -> int:
    """How many linears of ``model`` compute through :class:`Int4Linear` (any: the model
    rounds activations to bf16, and ``spec.attention`` then keeps decoding exact)."""
    return sum(isinstance(m, Int4Linear) for m in model.modules())
