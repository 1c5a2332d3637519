"""Small models the backend tests compile (CPU, milliseconds)."""
from __future__ import annotations

import torch.nn as nn

V, H = 1200, 32  # a vocabulary above the backend's min_vocab_size, so the head is matched


class TinyDraft(nn.Module):
    """Embedding -> one MLP block -> LM head (``tied``: the embedding's weight) ->
    log-softmax top-4 of the last position (EAGLE-like)."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.mlp = nn.Sequential(nn.Linear(H, 4 * H), nn.SiLU(), nn.Linear(4 * H, H))
        self.lm_head = nn.Linear(H, V, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.mlp(h)
        return self.lm_head(h)[:, -1, :].log_softmax(-1).topk(4)
