"""Acceptance estimates without a speculative loop: early-exit agreement with the target.

Used by ``bench/bench_early_exit.py`` to choose a draft depth before running the
(slow) end-to-end demo.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import early_exit_draft

__all__ = ["early_exit_agreement"]


@torch.inference_mode()
def early_exit_agreement(target: nn.Module, sequences: list, depths: list[int]) -> dict:
    """How often an early exit after ``N`` layers predicts the target's next token.

    Teacher-forced: each sequence is scored once by the target and once per
    depth by :func:`early_exit_draft`; at every continuation position the
    draft's argmax is compared with the target's.  With greedy decoding this
    top-1 agreement ``a`` is the per-token acceptance rate, so ``a + a^2 + ... +
    a^gamma`` estimates the mean accepted tokens per step (independent positions).

    Parameters
    ----------
    target : a causal LM (``PreTrainedModel``)
    sequences : list of ``(prompt_len, ids [1, T])``; positions ``prompt_len - 1
        .. T - 2`` (those predicting the continuation) are scored
    depths : early-exit depths ``N`` to measure

    Returns
    -------
    dict
        ``{N: agreement in [0, 1]}``.
    """
    for prompt_len, ids in sequences:
        if not 1 <= prompt_len < ids.shape[-1]:
            raise ValueError(f"a sequence of {ids.shape[-1]} ids with prompt_len={prompt_len} has "
                             "no continuation to score (need 1 <= prompt_len < length)")
    reference = [target(input_ids=ids).logits[0].argmax(-1) for _, ids in sequences]
    result = {}
    for depth in depths:
        draft = early_exit_draft(target, depth)
        hits = total = 0
        for (prompt_len, ids), ref in zip(sequences, reference):
            pred = draft(input_ids=ids).logits[0].argmax(-1)
            scored = slice(prompt_len - 1, ids.shape[1] - 1)
            hits += int((pred[scored] == ref[scored]).sum())
            total += ids.shape[1] - prompt_len
        result[depth] = hits / total
    return result
