"""The target's CPU linears: exact 4-bit weights and prepacked fp32 products.

A speculative-decoding target on CPU spends its step in its linears.  Two preparations
keep its greedy output exactly what it computes by itself:

* :func:`prepare_target` (one verb, in the manner of torchao's ``quantize_``) runs the
  decoder linears whose fp32 weights are exact 4-bit groups (a de-quantized Q4 GGUF
  checkpoint) through torch's int4 weight-only kernel (:mod:`.int4`); the decoding loops
  then keep attention exact for such a target (:func:`needs_exact_attention`);
* :class:`PackedLinears` (:mod:`.packed`) packs every fp32 linear once for a fixed row
  count (a tree verification's size), with the fastest CPU kernel per weight shape.

>>> prepare_target(target, TargetConfig(weights="auto"))
'int4 (108 decoder linears, bf16 inputs; LM head fp32)'
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .int4 import count_int4_linears, int4_kernel_available, quantize_exact_int4
from .packed import PackedLinears, choose_kernel

__all__ = ["TARGET_WEIGHTS", "TargetConfig", "prepare_target", "target_weights_label",
           "needs_exact_attention", "PackedLinears", "choose_kernel"]

TARGET_WEIGHTS = ("auto", "int4", "fp32")


@dataclass(frozen=True)
class TargetConfig:
    """How :func:`prepare_target` prepares a target.

    Parameters
    ----------
    weights : ``"int4"`` (the exact 4-bit groups through the int4 kernel; an error if none
        qualifies), ``"fp32"`` (the linears as they are) or ``"auto"``: int4 when this torch
        has the kernel, some linear qualifies and the int4 product is measured faster on
        this CPU (timed once, on the most common weight shape)
    """

    weights: str = "auto"

    def __post_init__(self):
        if self.weights not in TARGET_WEIGHTS:
            raise ValueError(f"weights must be one of {' / '.join(TARGET_WEIGHTS)}, "
                             f"got {self.weights!r}")


def prepare_target(target: nn.Module, config: TargetConfig | None = None) -> str:
    """Prepare ``target``'s linears in place as ``config`` says; returns what they compute
    with (:func:`target_weights_label`), for reports."""
    config = config or TargetConfig()
    choice = config.weights
    if choice == "int4" or (choice == "auto" and int4_kernel_available()):
        replaced = quantize_exact_int4(target, check_speed=choice == "auto")
        if replaced == 0 and choice == "int4" and not count_int4_linears(target):
            raise ValueError("weights='int4': no linear of the target holds exact 4-bit "
                             "groups (a de-quantized Q4_0/Q4_1/Q4_K checkpoint); use 'fp32'")
    return target_weights_label(target)


def target_weights_label(target: nn.Module) -> str:
    """What the target's linears compute with, for reports."""
    count = count_int4_linears(target)
    return f"int4 ({count} decoder linears, bf16 inputs; LM head fp32)" if count else "fp32"


def needs_exact_attention(target: nn.Module) -> bool:
    """Whether the decoding loops must keep ``target``'s attention exact: its int4 linears
    round activations to bf16, where a tree's attention over many rows and a one-token
    step's would round apart (``spec.attention``)."""
    return count_int4_linears(target) > 0
