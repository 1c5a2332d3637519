"""Held-out quality of an EAGLE head: teacher-forced top-1 agreement with the target.

The held-out text is the target's own greedy continuation of evaluation prompts
(MT-bench first turns and HumanEval stubs, never trained on).  At every
continuation position the head reads the target's true feature and the next
token, and its argmax is compared with the target's argmax one position later.
With greedy decoding this agreement is the acceptance rate of the head's first
draft token at each step of a chain.
"""
from __future__ import annotations

import torch

from ...heads import EagleHead
from ..data import humaneval_problems, mtbench_questions
from .corpus import Sequence, chat_prompt_ids, regenerate
from .features import target_features

__all__ = ["evaluation_prompts", "held_out_continuations", "head_agreement", "agreement_by_group",
           "prompt_ids"]


def evaluation_prompts(mtbench: int = 10, humaneval: int = 10) -> list[dict]:
    """Held-out prompts: MT-bench first turns spread over the categories, HumanEval stubs.

    Returns ``{"name", "text", "chat"}`` dicts (``chat``: use the chat template).
    """
    questions = mtbench_questions()
    stride = max(1, len(questions) // max(mtbench, 1))
    out = [{"name": f"mtbench/{q['question_id']}", "text": q["turns"][0], "chat": True}
           for q in questions[::stride][:mtbench]]
    out += [{"name": p["task_id"], "text": p["prompt"], "chat": False}
            for p in humaneval_problems()[:humaneval]]
    return out


def held_out_continuations(target, tokenizer, prompts: list[dict],
                           max_new_tokens: int = 96) -> list[Sequence]:
    """The target's greedy continuations of ``prompts`` (chat ones answered in the template)."""
    ids = [prompt_ids(tokenizer, p)[0].tolist() for p in prompts]
    return regenerate(target, tokenizer, ids, max_new_tokens=max_new_tokens,
                      batch_size=len(ids), max_prompt=1 << 20)


@torch.inference_mode()
def head_agreement(target, head: EagleHead, sequences: list[Sequence]) -> dict:
    """Teacher-forced top-1 agreement of ``head`` with ``target`` (fp32, exact features).

    Returns
    -------
    dict: ``agreement`` in [0, 1] over all answer positions, ``positions`` scored,
    ``per_sequence`` list of agreements, ``per_sequence_positions`` their position counts,
    ``depth2_agreement``: the same one step deeper on the head's own predicted features
    (``EagleHead.rollout_hidden``, what a depth-1 tree node computes)
    """
    from transformers import DynamicCache

    hits = total = deep_hits = deep_total = 0
    per_sequence, counts = [], []
    for seq in sequences:
        ids = seq.ids.view(1, -1)
        feats = target_features(target, ids)
        t = ids.shape[1]
        positions = torch.arange(t - 1).view(1, -1)
        cache = DynamicCache(config=head.attention_config)
        hidden = head.hidden(ids[:, 1:], feats[:, :-1], positions, cache=cache)
        target_next = head.lm_head(feats[:, 1:]).argmax(-1)
        start = max(seq.prompt_len - 2, 0)  # pair i predicts token i + 2
        agree = (head.lm_head(hidden).argmax(-1) == target_next)[0, start:]
        hits += int(agree.sum())
        total += agree.numel()
        per_sequence.append(float(agree.float().mean()) if agree.numel() else float("nan"))
        counts.append(agree.numel())
        if t >= 3:
            deeper = head.rollout_hidden(ids[:, 1:], hidden, positions, cache)
            deep = (head.lm_head(deeper).argmax(-1) == target_next[:, 1:])[0, max(start - 1, 0):]
            deep_hits += int(deep.sum())
            deep_total += deep.numel()
    return {"agreement": hits / max(total, 1), "positions": total, "per_sequence": per_sequence,
            "per_sequence_positions": counts, "depth2_agreement": deep_hits / max(deep_total, 1)}


def agreement_by_group(names: list[str], quality: dict) -> dict[str, float]:
    """Position-weighted agreement per prompt family (``mtbench/12`` -> ``mtbench``)."""
    hits: dict[str, float] = {}
    total: dict[str, int] = {}
    for name, rate, n in zip(names, quality["per_sequence"], quality["per_sequence_positions"]):
        group = name.split("/")[0]
        if n:
            hits[group] = hits.get(group, 0.0) + rate * n
            total[group] = total.get(group, 0) + n
    return {g: hits[g] / total[g] for g in total}


def prompt_ids(tokenizer, prompt: dict) -> torch.Tensor:
    """``[1, P]`` ids of an evaluation prompt (template for chat prompts, raw text otherwise)."""
    if prompt["chat"]:
        return torch.tensor([chat_prompt_ids(tokenizer, prompt["text"])])
    return tokenizer(prompt["text"], return_tensors="pt")["input_ids"]
