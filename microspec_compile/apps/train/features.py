"""Teacher-forced target features, cached on disk so training epochs never rerun the target.

The feature of position ``t`` is the target's last hidden state after its final norm
(``target.model(ids).last_hidden_state``, what its LM head reads).  A cache file
holds every sequence back to back:

    ids         [N] int32     all tokens
    features    [N, H] fp16   their features
    starts      [S + 1] int64 sequence s is ``starts[s]:starts[s + 1]``
    prompt_lens [S] int64     the loss covers positions ``>= prompt_len`` of each
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import Sequence
from .precision import bf16_is_faster

__all__ = ["FeatureSet", "starts_of", "atomic_save", "target_features", "compute_features",
           "frequent_ids"]


def starts_of(lengths: torch.Tensor) -> torch.Tensor:
    """``starts [S + 1]`` of sequences of ``lengths [S]`` laid back to back."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.long().cumsum(0)])


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` through a temporary file: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class FeatureSet:
    """Sequences with their cached target features (layout in the module docstring)."""

    ids: torch.Tensor
    features: torch.Tensor
    starts: torch.Tensor
    prompt_lens: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def sequence(self, s: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(ids [T] int64, features [T, H] fp16, prompt_len)`` of sequence ``s``."""
        a, b = int(self.starts[s]), int(self.starts[s + 1])
        return self.ids[a:b].long(), self.features[a:b], int(self.prompt_lens[s])

    def lengths(self) -> torch.Tensor:
        return self.starts[1:] - self.starts[:-1]

    def answer_tokens(self) -> int:
        return int((self.lengths() - self.prompt_lens).sum())

    def select(self, indices: list[int]) -> "FeatureSet":
        """The sequences ``indices`` (in that order) as a new set."""
        parts = [self.sequence(s) for s in indices]
        lengths = torch.tensor([len(ids) for ids, _, _ in parts], dtype=torch.int64)
        return FeatureSet(torch.cat([ids for ids, _, _ in parts]).to(torch.int32),
                          torch.cat([f for _, f, _ in parts]),
                          starts_of(lengths),
                          torch.tensor([p for _, _, p in parts], dtype=torch.int64))

    def save(self, path: str | Path) -> None:
        atomic_save(self.__dict__, path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        return cls(**torch.load(path, weights_only=True))

    @classmethod
    def concat(cls, sets: list["FeatureSet"]) -> "FeatureSet":
        starts, offset = [torch.zeros(1, dtype=torch.int64)], 0
        for fs in sets:
            starts.append(fs.starts[1:] + offset)
            offset += int(fs.starts[-1])
        return cls(torch.cat([f.ids for f in sets]), torch.cat([f.features for f in sets]),
                   torch.cat(starts), torch.cat([f.prompt_lens for f in sets]))


@torch.inference_mode()
def target_features(target, ids: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """The target's post-norm last hidden states ``[B, T, H]`` for ``ids [B, T]``.

    ``autocast`` runs the target in bf16 (about 4x faster on a CPU with AMX).
    """
    base = getattr(target, target.base_model_prefix)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return base(input_ids=ids).last_hidden_state.float()


def compute_features(target, sequences: list[Sequence], *, autocast: bool | None = None,
                     token_budget: int = 4096, progress=None) -> FeatureSet:
    """Features of every sequence, batched by length (right padding, causal: pads are inert).

    ``autocast``: run the target in bf16; None: where bf16 is faster on this CPU.
    """
    if autocast is None:
        autocast = bf16_is_faster()
    order = sorted(range(len(sequences)), key=lambda s: len(sequences[s].ids))
    feats: list[torch.Tensor | None] = [None] * len(sequences)
    first = 0
    while first < len(order):
        width = len(sequences[order[first]].ids)
        last = first + 1
        while last < len(order) and len(sequences[order[last]].ids) * (last - first + 1) <= token_budget:
            last += 1
        batch = order[first:last]
        width = max(len(sequences[s].ids) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.int64)
        for row, s in enumerate(batch):
            ids[row, : len(sequences[s].ids)] = sequences[s].ids
        out = target_features(target, ids, autocast)
        for row, s in enumerate(batch):
            feats[s] = out[row, : len(sequences[s].ids)].to(torch.float16)
        if progress is not None:
            progress(last - first)
        first = last
    lengths = torch.tensor([len(s.ids) for s in sequences], dtype=torch.int64)
    starts = starts_of(lengths)
    return FeatureSet(torch.cat([s.ids for s in sequences]).to(torch.int32), torch.cat(feats),
                      starts, torch.tensor([s.prompt_len for s in sequences], dtype=torch.int64))


def frequent_ids(tokens: torch.Tensor, vocab_size: int, count: int | None = None) -> torch.Tensor:
    """The ``count`` most frequent ids of ``tokens`` (None: every id of the vocabulary),
    most frequent first, ties broken by id (FR-Spec's fixed sub-vocabulary)."""
    counts = torch.bincount(tokens.long(), minlength=vocab_size).double()
    order = torch.argsort(-counts + torch.arange(vocab_size) / (2.0 * vocab_size))
    return order[: max(1, vocab_size if count is None else int(count))]
