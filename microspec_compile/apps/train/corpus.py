"""Training text for an EAGLE head: ShareGPT prompts, answered by the target itself.

Two kinds of sequences, both in the target's chat template:

* ``regenerated``: the first user turn of a ShareGPT conversation, answered by the
  target with batched greedy decoding (the text the head will see at inference:
  HASS / EAGLE-3 report higher acceptance from it);
* ``original``: the same kind of prompt with ShareGPT's own (ChatGPT) answer.

Every evaluation prompt (the 80 MT-bench questions, both turns, and the 164
HumanEval prompts) is held out: a conversation whose first turn matches one of
them is never trained on.  A sequence is ``(ids [T] int64, prompt_len)``; only the
answer (positions ``prompt_len..T-1``) carries the loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data import humaneval_problems, mtbench_questions, sharegpt_conversations
from .precision import bf16_is_faster

__all__ = ["Sequence", "held_out_texts", "training_prompts", "chat_prompt_ids",
           "original_sequences", "regenerate"]

_MAX_USER_CHARS = 1500


@dataclass
class Sequence:
    """One training sequence: ``ids [T]`` (prompt + answer) and the prompt's length."""

    ids: torch.Tensor
    prompt_len: int


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def held_out_texts() -> set[str]:
    """Normalised texts of every evaluation prompt (MT-bench turns, HumanEval prompts)."""
    texts = {_normalise(t) for q in mtbench_questions() for t in q["turns"]}
    texts |= {_normalise(p["prompt"]) for p in humaneval_problems()}
    return texts


def training_prompts(limit: int, skip: int = 0) -> list[tuple[str, str]]:
    """``(user turn, ShareGPT answer)`` pairs, evaluation prompts held out.

    Parameters
    ----------
    limit : at most this many pairs
    skip : conversations to skip first (disjoint slices for disjoint uses)
    """
    held = held_out_texts()
    pairs = []
    if limit <= 0:
        return pairs
    for conv in sharegpt_conversations(skip=skip):
        user, answer = conv[0].strip(), conv[1].strip()
        if not user or not answer or _normalise(user) in held:
            continue
        pairs.append((user[:_MAX_USER_CHARS], answer))
        if len(pairs) >= limit:
            break
    return pairs


def chat_prompt_ids(tokenizer, user: str) -> list[int]:
    """Token ids of one user turn in the chat template, ready for the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def original_sequences(tokenizer, pairs, max_len: int = 512,
                       max_prompt: int = 256) -> list[Sequence]:
    """ShareGPT's own answers after the templated prompt, cut to ``max_len`` tokens."""
    end = tokenizer.eos_token_id
    out = []
    for user, answer in pairs:
        prompt = chat_prompt_ids(tokenizer, user)
        if len(prompt) > max_prompt:
            continue
        reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        ids = (prompt + reply)[:max_len]
        if len(ids) > len(prompt) + 1:
            out.append(Sequence(torch.tensor(ids, dtype=torch.int64), len(prompt)))
    return out


@torch.inference_mode()
def regenerate(target, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 192,
               batch_size: int = 32, max_prompt: int = 256, seconds: float = float("inf"),
               progress=None) -> list[Sequence]:
    """Continue ``prompts`` (token id lists) with the target (batched greedy; a bf16 copy of an
    fp32 target where bf16 is faster on this CPU, :func:`.precision.bf16_is_faster`).

    Prompts are sorted by length so that batches carry little padding; generation
    stops after ``seconds`` (whole batches only), so a time budget bounds the run.

    Returns
    -------
    list of Sequence, prompt + the target's answer up to and including its EOS
    """
    import copy

    model = (copy.deepcopy(target).to(torch.bfloat16)
             if target.dtype == torch.float32 and bf16_is_faster() else target)
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = end if pad is None else pad
    encoded = [list(ids) for ids in prompts if len(ids) <= max_prompt]
    encoded.sort(key=len)
    start, out = time.perf_counter(), []
    for first in range(0, len(encoded), batch_size):
        if time.perf_counter() - start > seconds:
            break
        batch = encoded[first:first + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):  # left padding: answers start together
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=end, pad_token_id=pad)
        for row, prompt in enumerate(batch):
            answer = gen[row, width:].tolist()
            if end in answer:
                answer = answer[: answer.index(end) + 1]
            if answer:
                out.append(Sequence(torch.tensor(prompt + answer), len(prompt)))
        if progress is not None:
            progress(len(out), sum(len(s.ids) - s.prompt_len for s in out))
    return out
