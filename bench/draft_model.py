"""The EAGLE-2-shaped draft of ``bench_draft_step.py``: one Llama decoder layer, the tree step.

The draft is embedding -> one Llama decoder layer of the real shape (RMSNorm, GQA
attention with RoPE over a ``KV_LEN``-position KV cache, SwiGLU MLP; random weights)
-> final RMSNorm (:class:`Body`); ``heads.dense_head(weight, body)`` adds the LM head,
log_softmax and topk(10). :func:`tree_step` calls it as EAGLE-2's tree expansion
does. Also the backend wrapper that counts compiles and the Inductor helpers.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from heads import TOP_K
from shapes import Shape

__all__ = ["KV_LEN", "DEPTHS", "Body", "LayerOnly", "tree_step", "layer_step", "CountingBackend",
           "inductor_backend", "pay_inductor_startup", "fx_cache_delta"]

DEPTHS = 6
KV_LEN = 512


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, dtype, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecoderLayer(nn.Module):
    """A Llama decoder layer (GQA + RoPE + SwiGLU) over a fixed KV cache of past positions."""

    def __init__(self, s: Shape, dtype):
        super().__init__()
        hd = s.hidden // s.heads
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, hd
        lin = lambda i, o, b=False: nn.Linear(i, o, bias=b, dtype=dtype)  # noqa: E731
        self.input_norm = RMSNorm(s.hidden, dtype)
        self.q_proj = lin(s.hidden, s.heads * hd, s.qkv_bias)
        self.k_proj = lin(s.hidden, s.kv_heads * hd, s.qkv_bias)
        self.v_proj = lin(s.hidden, s.kv_heads * hd, s.qkv_bias)
        self.o_proj = lin(s.heads * hd, s.hidden)
        self.post_norm = RMSNorm(s.hidden, dtype)
        self.gate_proj = lin(s.hidden, s.intermediate)
        self.up_proj = lin(s.hidden, s.intermediate)
        self.down_proj = lin(s.intermediate, s.hidden)
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq)
        self.register_buffer("k_cache", torch.randn(1, s.kv_heads, KV_LEN, hd).to(dtype))
        self.register_buffer("v_cache", torch.randn(1, s.kv_heads, KV_LEN, hd).to(dtype))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, positions):
        b, n, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        freqs = positions.float()[:, None, :, None] * self.inv_freq  # [b, 1, n, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat((self.k_cache, k), dim=2)
        v = torch.cat((self.v_cache, v), dim=2)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, n, -1))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Body(nn.Module):
    """Embedding + decoder layer + final norm (shared by every provider)."""

    def __init__(self, s: Shape, dtype, embed_weight: torch.Tensor):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden, device="meta", dtype=dtype)
        self.embed_tokens.weight = nn.Parameter(embed_weight, requires_grad=False)
        self.layer = DecoderLayer(s, dtype)
        self.norm = RMSNorm(s.hidden, dtype)

    def forward(self, input_ids, positions):
        return self.norm(self.layer(self.embed_tokens(input_ids), positions))


class LayerOnly(nn.Module):
    def __init__(self, body: Body):
        super().__init__()
        self.body = body

    def forward(self, input_ids, positions):
        return self.body(input_ids, positions)


def tree_step(fn, root: torch.Tensor, cuda_graphs: bool = False) -> list[torch.Tensor]:
    """EAGLE-2 tree expansion: 1 row, then DEPTHS x 10 rows; returns the fed id tensors.

    ``fn(ids [1, n], positions [1, n]) -> (log-probs [1, n, k], ids [1, n, k])``. Each depth
    feeds the 10 best of the previous call's 10 x 10 candidates by cumulative log-probability
    (the tree selection runs eagerly, as in EAGLE). ``cuda_graphs``: mark a new step before
    every call (the previous outputs are dead, so CUDA graphs may reuse their memory).
    """
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if cuda_graphs else None
    if mark is not None:
        mark()
    fed = [root]
    values, ids = fn(root, torch.full_like(root, KV_LEN))
    parent = torch.zeros(1, dtype=torch.float32, device=root.device)
    for depth in range(1, DEPTHS + 1):
        scores = (values[0].float() + parent[:, None]).flatten()
        best = torch.topk(scores, TOP_K)
        parent = best.values
        nxt = ids[0].flatten()[best.indices].view(1, TOP_K)
        fed.append(nxt)
        if mark is not None:
            mark()
        values, ids = fn(nxt, torch.full_like(nxt, KV_LEN + depth))
    return fed


def layer_step(fn, root: torch.Tensor, ids10: torch.Tensor) -> None:
    """The same call pattern without a head (fixed ids at every depth)."""
    fn(root, torch.full_like(root, KV_LEN))
    for depth in range(1, DEPTHS + 1):
        fn(ids10, torch.full_like(ids10, KV_LEN + depth))


class CountingBackend:
    """Wraps a backend; counts its calls (each compile / recompile) and their time."""

    def __init__(self, inner):
        self.inner, self.calls, self.seconds = inner, 0, 0.0

    def __call__(self, gm, example_inputs):
        t0 = time.perf_counter()
        out = self.inner(gm, example_inputs)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out


def fx_cache_delta(before: dict) -> str:
    """FX graph cache hits / misses / bypasses since ``before`` (Inductor counters)."""
    now = torch._dynamo.utils.counters["inductor"]
    parts = [f"{k}={now.get(f'fxgraph_cache_{k}', 0) - before.get(f'fxgraph_cache_{k}', 0)}"
             for k in ("hit", "miss", "bypass")]
    return " ".join(parts)


def inductor_backend(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def pay_inductor_startup() -> float:
    t0 = time.perf_counter()
    fn = torch.compile(lambda x: torch.log_softmax(x @ x.t(), -1).topk(2), backend=inductor_backend)
    fn(torch.randn(4, 4))
    return time.perf_counter() - t0
