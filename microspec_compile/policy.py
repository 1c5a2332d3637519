"""MicroSpec's vocabulary policy: which tokens join the draft's active vocabulary, and when.

MicroSpec's policy (the paper's; NanoSpec's code), in one place for both ways of
running it:

* after prefill: the prompt's ids and the target's top-``k`` at every prompt position
  (:func:`observe_prompt`);
* after every verification: the verified tree's tokens, the emitted ones and the
  target's top-``k`` at every verified position, its argmax included
  (:func:`observe_verified`).

A :class:`VocabPolicy` sets the two ``k``: :data:`PAPER` is the paper's (3 and 3);
:data:`TUNED`, the decoders' default, drops the prompt signal (its product with the whole
head is the prefill's largest extra cost) and takes the target's top-8 at verified
positions instead.

The tree loops (``spec.eagle``) call these functions.  Hugging Face ``generate`` runs
its own loop, so there the target's graph computes :func:`target_top_ids` itself: the
observer (``observer.py``) inserts a call of it after the target's LM head, and
observes what it returns.  ``TARGET_TOPK`` is the default ``k`` of both.

Why the target's top-k helps: the token after a verified one is very often among the
target's own best few at a nearby position, so tokens the context never held still
enter the vocabulary a step early (``bench/bench_coverage_model.py`` measures it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .cpu import cpu_flags

__all__ = ["TARGET_TOPK", "VocabPolicy", "PAPER", "TUNED", "POLICIES", "target_top_ids",
           "prompt_top_ids", "observe_prompt", "observe_verified", "fast_bf16_products"]

#: The target's best tokens per scored position that join the vocabulary (the paper's 3).
TARGET_TOPK = 3


@dataclass(frozen=True)
class VocabPolicy:
    """Which of the target's best tokens join a decoder's vocabulary, beside the prompt's
    ids, the verified trees' tokens, the emitted ones and the pinned ids (always).

    Parameters
    ----------
    prompt_topk : the target's top-k at every prompt position after prefill; 0: none,
        and no product of every prompt position with the whole head (with a 262k-token
        vocabulary, most of MicroSpec's extra prefill time: docs/RESULTS.md)
    verified_topk : the target's top-k at every verified position, from the logits the
        verification computed anyway; 0: each position's argmax alone
    """

    prompt_topk: int = 0
    verified_topk: int = 8

    def __post_init__(self):
        for name in ("prompt_topk", "verified_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")


#: MicroSpec's own policy (the paper): the target's top-3 at every prompt and verified position.
PAPER = VocabPolicy(prompt_topk=TARGET_TOPK, verified_topk=TARGET_TOPK)
#: The default: no prompt signal (no prefill cost), the target's top-8 at verified positions;
#: on the demo's prompts it covers more of the emitted tokens than PAPER (docs/RESULTS.md).
TUNED = VocabPolicy(prompt_topk=0, verified_topk=8)
POLICIES = {"paper": PAPER, "tuned": TUNED}

# an LM-head weight -> (weight._version when copied, its bf16 copy); dropped with the weight
_BF16_COPIES = WeakIdKeyDictionary()


def target_top_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., k]`` ids of the ``k`` best of ``logits [..., V]`` (the observer puts this
    call in the target's graph, so it must stay traceable)."""
    return torch.topk(logits, k, dim=-1).indices


def fast_bf16_products(device: torch.device) -> bool:
    """Whether bf16 matrix products are native on ``device``: CUDA, or a CPU with
    AVX512-BF16 or AMX-BF16 (oneDNN emulates them elsewhere, slower than fp32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _bf16_copy(weight: torch.Tensor) -> torch.Tensor:
    version, copy = _BF16_COPIES.get(weight, (None, None))
    if copy is None or version != weight._version:  # made once; again if changed in place
        copy = weight.detach().to(torch.bfloat16)
        _BF16_COPIES[weight] = (weight._version, copy)
    return copy


@torch.no_grad()
def prompt_top_ids(lm_head: nn.Module, hidden: torch.Tensor, k: int,
                   rows: int = 256) -> torch.Tensor:
    """``[N, k]`` ids of the ``k`` highest scores of ``lm_head`` (``Linear(H, V)``) at each
    row of ``hidden [N, H]``, ``rows`` rows at a time.

    For the vocabulary's policy, never for choosing a token: where bf16 products are
    native (:func:`fast_bf16_products`) the scores are computed in bf16 from a copy of
    the weight made once (the prompt's 210 rows x 49152: 21 vs 97 ms in fp32 on an
    AMD EPYC with AVX512-BF16), so near-ties may rank otherwise than in fp32; that only
    changes which ids the vocabulary holds, and the target verifies every token.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be float features, got dtype {hidden.dtype}")
    if hidden.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, {weight.shape[1]}], got {list(hidden.shape)}")
    if fast_bf16_products(weight.device) and weight.dtype != torch.bfloat16:
        weight, hidden = _bf16_copy(weight), hidden.to(torch.bfloat16)
        bias = None if bias is None else bias.to(torch.bfloat16)
    else:
        hidden = hidden.to(weight.dtype)
    return torch.cat([target_top_ids(torch.nn.functional.linear(chunk, weight, bias), k)
                      for chunk in hidden.split(rows)])


def observe_prompt(vocab, input_ids: torch.Tensor, lm_head: nn.Module, features: torch.Tensor,
                   k: int = TARGET_TOPK) -> None:
    """A new request: ``vocab`` reset, then the prompt's ids ``[1, P]`` and the target's
    top-``k`` at every prompt position (``features [P, H]``; ``k`` 0: none) observed."""
    vocab.reset()
    vocab.observe(input_ids)
    if k:
        vocab.observe(prompt_top_ids(lm_head, features, k))


def observe_verified(vocab, tree_tokens: torch.Tensor, logits: torch.Tensor, emitted: list[int],
                     k: int = TARGET_TOPK) -> None:
    """After a verification: the tree's tokens ``[T]``, the emitted ones and the target's
    top-``k`` at each of the ``T`` verified positions (``logits [T, V]``; ``k`` 0: the
    argmax alone, which the emitted tokens hold only along the accepted path)."""
    dev = vocab.rows.device
    top = target_top_ids(logits, max(k, 1))
    vocab.observe(torch.cat([tree_tokens.to(dev), torch.tensor(emitted, device=dev),
                             top.reshape(-1).to(dev)]))
