"""Latency of an EAGLE-2-shaped draft step: dense head vs FR-Spec 32k vs microspec.

The draft is embedding -> one Llama decoder layer of the real shape (RMSNorm, GQA
attention with RoPE over a 512-position KV cache, SwiGLU MLP; random weights) ->
final RMSNorm -> LM head -> log_softmax -> topk(10), as EAGLE calls it, all compiled.
One *step* is EAGLE-2's tree expansion: one call with 1 row (the root), then 6 depths
of one call with 10 rows, each depth's 10 inputs being the best 10 of the previous
call's 10x10 candidates by cumulative log-probability (61 tree tokens per step).

Providers (interleaved in shuffled order every round, cache flushed before each step)
----------------------------------------------------------------------------------
- ``inductor_dense``: the draft compiled with Inductor;
- ``inductor_frspec32k``: the same layer with a fixed 32768-row head + index map;
- ``microspec``: the *same dense draft* compiled with the microspec backend
  (capacity 4096, vocabulary ~3k: refilled with 3000 ids every 16 rounds, +60 per round);
  the compiled graph observes its input ids itself (``auto-observe``);
- ``layer_only``: embedding + layer + final norm, no head (for the breakdown);
- ``observe60``: ``vocab.observe`` of 60 token ids not yet active (the per-step update
  after verification; this changes the vocabulary under the compiled graph);
- ``auto_observe``: ``vocab.observe`` of the step's 61 (already active) tree ids in
  7 calls, what the in-graph observes cost (included in ``microspec``).

Compile time and recompiles (``compile.csv``): dense and microspec are compiled
with Inductor's caches disabled (``force_disable_caches``: a cold compile each, except
in --smoke), the others with caches on; Inductor's start-up is paid by a throw-away
compile first; per provider we record the first step's wall time, the time spent in the
backend, the graphs compiled in the first step, and the backend calls (= recompiles)
over the following steps (the timing rounds, topped up to 200 dense + microspec steps
where the plan asks for the check; the vocabulary changes before every microspec
step), plus ``counters["stats"]["unique_graphs"]`` over those steps. --quick runs the
cold compiles and the 200-step check on smollm2 fp32, and a few rounds of llama3-8b
bf16 with warm caches (a dense llama3-8b step takes seconds on a 2-core CPU).

Usage: ``python bench/bench_draft_step.py [--smoke | --quick | --full] [--shapes ..]
[--dtypes ..]`` (default --quick). Rows go to ``bench/results/draft_step.csv`` and
``bench/results/compile.csv``.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import append_rows, loadavg, percentiles  # noqa: E402

import microspec_compile  # noqa: E402
from microspec_compile.vocab import vocab_for_weight  # noqa: E402

CSV_NAME = "draft_step.csv"
COMPILE_CSV = "compile.csv"
TOP_K = 10
DEPTHS = 6
KV_LEN = 512
CAPACITY = 4096
ACTIVE = 3000
NEW_PER_STEP = 60
REFILL_EVERY = 16
FRSPEC_SIZE = 32768
TARGET_RATIO = 0.37
MIN_COMPILE_STEPS = 200
COMPARED = ("inductor_dense", "microspec")  # compiled with Inductor's caches off (cold)


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    qkv_bias: bool = False
    tied: bool = False
    rope_theta: float = 500000.0


SHAPES = {
    "llama3-8b": Shape(128256, 4096, 32, 8, 14336),
    "qwen2-7b": Shape(152064, 3584, 28, 4, 18944, qkv_bias=True, rope_theta=1e6),
    "llama3.2-1b": Shape(128256, 2048, 32, 8, 8192, tied=True),
    "smollm2": Shape(49152, 576, 9, 3, 1536, tied=True, rope_theta=1e5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

@dataclass(frozen=True)
class Plan:
    """What to run for one (shape, dtype): timing rounds, steps after the warm-up over
    which dense and microspec must not recompile, and whether they compile cold."""

    shape: str
    dtype: str
    rounds: int
    compile_steps: int
    cold_compile: bool


def _default_plan(shape: str, dtype: str) -> Plan:
    small = SHAPES[shape].vocab * SHAPES[shape].hidden < 2**27
    return Plan(shape, dtype, 100 if small else 10, MIN_COMPILE_STEPS, True)


MODES = {
    "smoke": (Plan("smollm2", "fp32", 3, 8, False),),
    # On a loaded 2-core CPU a llama3-8b bf16 step (7 calls, dense head) takes seconds:
    # the compile / recompile check (cold compiles, 200 steps) runs on smollm2, the
    # large shape gets a few interleaved rounds with warm caches.
    "quick": (Plan("smollm2", "fp32", 40, MIN_COMPILE_STEPS, True),
              Plan("llama3-8b", "bf16", 3, 0, False)),
    "full": tuple(_default_plan(sh, dt) for sh in SHAPES for dt in DTYPES),
}


# --------------------------------------------------------------------- model

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


class DenseDraft(nn.Module):
    def __init__(self, body: Body, head_weight: torch.Tensor):
        super().__init__()
        self.body = body
        self.lm_head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False,
                                 device="meta", dtype=head_weight.dtype)
        self.lm_head.weight = (body.embed_tokens.weight if head_weight is body.embed_tokens.weight
                               else nn.Parameter(head_weight, requires_grad=False))

    def forward(self, input_ids, positions):
        logits = self.lm_head(self.body(input_ids, positions))
        return torch.topk(F.log_softmax(logits, dim=-1), TOP_K, dim=-1)


class FrSpecDraft(nn.Module):
    def __init__(self, body: Body, head_weight: torch.Tensor, subset: torch.Tensor):
        super().__init__()
        self.body = body
        self.lm_head = nn.Linear(head_weight.shape[1], subset.numel(), bias=False,
                                 device="meta", dtype=head_weight.dtype)
        self.lm_head.weight = nn.Parameter(head_weight[subset].contiguous(), requires_grad=False)
        self.register_buffer("id_map", subset.clone())

    def forward(self, input_ids, positions):
        logits = self.lm_head(self.body(input_ids, positions))
        values, index = torch.topk(F.log_softmax(logits, dim=-1), TOP_K, dim=-1)
        return values, self.id_map[index]


class LayerOnly(nn.Module):
    def __init__(self, body: Body):
        super().__init__()
        self.body = body

    def forward(self, input_ids, positions):
        return self.body(input_ids, positions)


# --------------------------------------------------------------------- helpers

def random_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(rows, cols)
    bound = 1.0 / math.sqrt(cols)
    for start in range(0, rows, 16384):
        w[start:start + 16384].uniform_(-bound, bound, generator=gen)
    return w


def tree_step(fn, root: torch.Tensor) -> list[torch.Tensor]:
    """EAGLE-2 tree expansion: 1 row, then DEPTHS x 10 rows; returns the fed id tensors.

    Each depth feeds the 10 best of the previous call's 10 x 10 candidates by
    cumulative log-probability (the tree selection runs eagerly, as in EAGLE).
    """
    fed = [root]
    values, ids = fn(root, torch.full_like(root, KV_LEN))
    parent = torch.zeros(1, dtype=torch.float32)
    for depth in range(1, DEPTHS + 1):
        scores = (values[0].float() + parent[:, None]).flatten()
        best = torch.topk(scores, TOP_K)
        parent = best.values
        nxt = ids[0].flatten()[best.indices].view(1, TOP_K)
        fed.append(nxt)
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


def _fx_cache_delta(before: dict) -> str:
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


# --------------------------------------------------------------------- the run

def run_pair(plan: Plan, mode: str, bar) -> tuple[list, list]:
    shape_name, dname = plan.shape, plan.dtype
    s = SHAPES[shape_name]
    dtype = DTYPES[dname]
    torch._dynamo.reset()
    torch.manual_seed(0)
    bar.set_postfix_str(f"{shape_name} {dname}: weights")
    head_w = random_matrix(s.vocab, s.hidden, seed=0).to(dtype)
    embed_w = head_w if s.tied else random_matrix(s.vocab, s.hidden, seed=1).to(dtype)
    body = Body(s, dtype, embed_w).eval()
    with torch.no_grad():
        for p in body.layer.parameters():
            if p.dim() == 2:
                p.uniform_(-1 / math.sqrt(p.shape[1]), 1 / math.sqrt(p.shape[1]))
    dense = DenseDraft(body, head_w if not s.tied else body.embed_tokens.weight).eval()
    gen = torch.Generator().manual_seed(2)
    subset = torch.randperm(s.vocab, generator=gen)[:FRSPEC_SIZE].sort().values
    frspec = FrSpecDraft(body, dense.lm_head.weight, subset).eval()
    layer_only = LayerOnly(body).eval()
    param = dense.lm_head.weight
    vocab = vocab_for_weight(param, CAPACITY, ())
    perm = torch.randperm(s.vocab, generator=gen)
    active_pool = perm[:ACTIVE]
    fresh = perm[ACTIVE:]  # ids never in the 3k base set, handed out 60 at a time
    state = {"fresh_at": 0, "since_refill": 0, "sizes": []}

    def refill():
        vocab.reset()
        vocab.observe(active_pool)
        state["since_refill"] = 0

    def next_new60() -> torch.Tensor:
        if state["since_refill"] >= REFILL_EVERY:
            refill()
        start = state["fresh_at"] % (fresh.numel() - NEW_PER_STEP)
        state["fresh_at"] = start + NEW_PER_STEP
        state["since_refill"] += 1
        return fresh[start:start + NEW_PER_STEP]

    refill()
    root = active_pool[:1].view(1, 1).clone()

    backends = {
        "inductor_dense": CountingBackend(inductor_backend),
        "inductor_frspec32k": CountingBackend(inductor_backend),
        "microspec": CountingBackend(microspec_compile.backend(capacity=CAPACITY)),
        "layer_only": CountingBackend(inductor_backend),
    }
    modules = {"inductor_dense": dense, "inductor_frspec32k": frspec, "microspec": dense,
               "layer_only": layer_only}
    compiled = {k: torch.compile(modules[k], backend=backends[k]) for k in backends}
    fed_last: dict[str, list] = {}

    def step_fn(name):
        if name == "layer_only":
            return lambda: layer_step(compiled[name], root, active_pool[1:1 + TOP_K].view(1, TOP_K))
        return lambda: fed_last.__setitem__(name, tree_step(compiled[name], root))

    def observe60():
        vocab.observe(next_new60())
        state["sizes"].append(vocab.size)

    def auto_observe():
        for ids in fed_last.get("microspec", [root]):
            vocab.observe(ids)

    flush_buf = torch.empty(16 * 2**20)
    compile_rows = []
    first_step = {}
    with torch.no_grad():
        # ---- compile phase: one provider at a time, global counters attributable
        for name in backends:
            bar.set_postfix_str(f"{shape_name} {dname}: compile {name}")
            g0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            fx0 = dict(torch._dynamo.utils.counters["inductor"])
            cold = plan.cold_compile and name in COMPARED
            t0 = time.perf_counter()
            with torch._inductor.config.patch(force_disable_caches=cold):
                step_fn(name)()
            first_step[name] = (time.perf_counter() - t0,
                                torch._dynamo.utils.counters["stats"]["unique_graphs"] - g0,
                                backends[name].calls, backends[name].seconds,
                                "disabled" if cold else "enabled", _fx_cache_delta(fx0))
            step_fn(name)()
        # correctness: microspec's drafted ids are all active
        check = "ok" if all(bool(vocab.contains(ids.clamp(min=0)).all())
                            for ids in fed_last["microspec"]) else "FAIL:ids-outside-S"
        calls_after_warmup = {k: b.calls for k, b in backends.items()}
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        sparse_calls0 = torch._dynamo.utils.counters["microspec"]["sparse_calls"]

        # ---- timing phase: interleaved rounds
        timed = {name: step_fn(name) for name in backends}
        timed["observe60"] = observe60
        timed["auto_observe"] = auto_observe
        samples = {k: [] for k in timed}
        steps_done = {k: 2 for k in backends}
        rounds = plan.rounds
        rng = random.Random(0)
        for r in range(rounds):
            order = list(timed)
            rng.shuffle(order)
            for name in order:
                flush_buf.fill_(1.0)
                t0 = time.perf_counter()
                timed[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
                if name in steps_done:
                    steps_done[name] += 1
            if r % 5 == 0:
                bar.set_postfix_str(f"{shape_name} {dname}: round {r + 1}/{rounds}")
        # ---- more steps (untimed) so dense and microspec see >= compile_steps steps,
        # the vocabulary changing before every microspec step
        extra = max(0, plan.compile_steps + 2 - min(steps_done["inductor_dense"],
                                                      steps_done["microspec"]))
        for i in range(extra):
            if i % 20 == 0:
                bar.set_postfix_str(f"{shape_name} {dname}: recompile check {i}/{extra}")
            observe60()
            timed["microspec"]()
            timed["inductor_dense"]()
            steps_done["microspec"] += 1
            steps_done["inductor_dense"] += 1
        graphs_after = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        sparse_calls = torch._dynamo.utils.counters["microspec"]["sparse_calls"] - sparse_calls0

    med = {k: statistics.median(v) for k, v in samples.items()}
    common_cols = {"mode": mode, "shape": shape_name, "vocab_size": s.vocab, "hidden": s.hidden,
                   "dtype": dname, "kv_len": KV_LEN, "depths": DEPTHS, "top_k": TOP_K,
                   "threads": torch.get_num_threads(), "loadavg": loadavg()}
    dense_ms = med["inductor_dense"]
    layer_ms = med["layer_only"]
    rows = []
    for name in timed:
        p20, p50, p80 = percentiles(samples[name])
        row = {**common_cols, "provider": name, "n_samples": len(samples[name]),
               "p20_ms": round(p20, 4), "p50_ms": round(p50, 4), "p80_ms": round(p80, 4),
               "ratio_vs_dense": round(p50 / dense_ms, 4) if name in backends else "",
               "layer_ms": round(layer_ms, 4), "head_ms": "", "auto_observe_ms": "",
               "observe60_ms": "", "step_plus_observe_ms": "", "ratio_plus_observe": "",
               "observe_share": "", "mean_vocab_size": "", "check": ""}
        if name in ("inductor_dense", "inductor_frspec32k", "microspec"):
            row["head_ms"] = round(p50 - layer_ms, 4)  # head + top-k + tree selection
        if name == "microspec":
            total = p50 + med["observe60"]
            row.update({
                "auto_observe_ms": round(med["auto_observe"], 4),
                "observe60_ms": round(med["observe60"], 4),
                "step_plus_observe_ms": round(total, 4),
                "ratio_plus_observe": round(total / dense_ms, 4),
                "observe_share": round((med["observe60"] + med["auto_observe"]) / total, 4),
                "mean_vocab_size": round(statistics.mean(state["sizes"]), 1),
                "check": check,
            })
        rows.append(row)
    for name in backends:
        wall, graphs, calls, backend_s, caches, fx_cache = first_step[name]
        steady = med[name] / 1e3
        compile_rows.append({
            **common_cols, "provider": name, "first_step_s": round(wall, 3),
            "steady_step_ms": round(med[name], 3),
            "compile_s": round(wall - steady, 3), "backend_s": round(backend_s, 3),
            "graphs_first_step": graphs, "backend_calls_first_step": calls,
            "steps_after_warmup": steps_done[name] - 2,
            "recompiles_after_warmup": backends[name].calls - calls_after_warmup[name],
            "unique_graphs_after_warmup_all": graphs_after - graphs_before,
            "vocab_changes": (steps_done[name] - 2) if name == "microspec" else "",
            "sparse_calls": sparse_calls if name == "microspec" else "",
            "caches": caches, "fx_graph_cache": fx_cache,
        })
    base = next(r for r in compile_rows if r["provider"] == "inductor_dense")["compile_s"]
    for r in compile_rows:
        r["compile_ratio_vs_dense"] = round(r["compile_s"] / base, 3) if base > 0 else ""
    del compiled, dense, frspec, layer_only, body, vocab, param, head_w, embed_w
    torch._dynamo.reset()
    return rows, compile_rows


def print_tables(rows: list[dict], compile_rows: list[dict]) -> None:
    header = (f"{'shape':<11} {'dtype':<4} {'provider':<19} {'p20_ms':>9} {'p50_ms':>9} "
              f"{'p80_ms':>9} {'x_dense':>7} {'head_ms':>8}")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        if last is not None and (r["shape"], r["dtype"]) != last:
            print()
        last = (r["shape"], r["dtype"])
        ratio = f"{r['ratio_vs_dense']:>7.4f}" if r["ratio_vs_dense"] != "" else f"{'':>7}"
        head = f"{r['head_ms']:>8.3f}" if r["head_ms"] != "" else f"{'':>8}"
        print(f"{r['shape']:<11} {r['dtype']:<4} {r['provider']:<19} {r['p20_ms']:>9.3f} "
              f"{r['p50_ms']:>9.3f} {r['p80_ms']:>9.3f} {ratio} {head}")
    print("(one step = 1 + 6 x 10 rows; head_ms = step - layer_only step)")
    for r in rows:
        if r["provider"] == "microspec":
            verdict = "meets" if r["ratio_plus_observe"] <= TARGET_RATIO else "MISSES"
            print(f"{r['shape']} {r['dtype']}: microspec step {r['p50_ms']:.3f} ms "
                  f"(x{r['ratio_vs_dense']:.4f} dense); + observe60 {r['observe60_ms']:.3f} ms = "
                  f"{r['step_plus_observe_ms']:.3f} ms (x{r['ratio_plus_observe']:.4f}, {verdict} "
                  f"<= {TARGET_RATIO}); in-graph observes ~{r['auto_observe_ms']:.3f} ms; "
                  f"observe share {r['observe_share']:.3f}; mean |S| {r['mean_vocab_size']}; "
                  f"check {r['check']}")
    print()
    header = (f"{'shape':<11} {'dtype':<4} {'provider':<19} {'first_s':>8} {'compile_s':>9} "
              f"{'backend_s':>9} {'x_dense':>7} {'graphs':>6} {'steps':>6} {'recompiles':>10}  "
              f"{'caches':<8} fx graph cache")
    print(header)
    print("-" * len(header))
    for r in compile_rows:
        ratio = f"{r['compile_ratio_vs_dense']:>7.3f}" if r["compile_ratio_vs_dense"] != "" else ""
        print(f"{r['shape']:<11} {r['dtype']:<4} {r['provider']:<19} {r['first_step_s']:>8.2f} "
              f"{r['compile_s']:>9.2f} {r['backend_s']:>9.2f} {ratio} "
              f"{r['graphs_first_step']:>6} {r['steps_after_warmup']:>6} "
              f"{r['recompiles_after_warmup']:>10}  {r['caches']:<8} {r['fx_graph_cache']}")
    print("(graphs: Dynamo graphs compiled in the first step (1 row, then 10 rows); "
          "recompiles: backend calls after the warm-up steps; unique_graphs over them, all "
          f"providers: {sorted({r['unique_graphs_after_warmup_all'] for r in compile_rows})})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="smollm2 fp32, a few rounds (for tests)")
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="smollm2 fp32 (+ compile check) and llama3-8b bf16 (default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every shape in fp32 and bf16")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), help="filter shapes")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="filter dtypes")
    parser.add_argument("--rounds", type=int, help="timing rounds per shape (overrides the mode)")
    parser.add_argument("--compile-steps", type=int,
                        help="steps after the warm-up for the recompile check (overrides the mode)")
    parser.add_argument("--keep-caches", action="store_true",
                        help="compile dense and microspec with Inductor's caches on too "
                             "(compile times then mean little; --smoke does)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    mode = args.mode or "quick"
    plans = [p for p in MODES[mode]
             if (not args.shapes or p.shape in args.shapes)
             and (not args.dtypes or p.dtype in args.dtypes)]
    if (args.shapes or args.dtypes) and not plans:  # outside the mode's pairs: their product
        plans = [_default_plan(sh, dt) for sh in (args.shapes or SHAPES)
                 for dt in (args.dtypes or DTYPES)]
    plans = [Plan(p.shape, p.dtype, args.rounds or p.rounds,
                  p.compile_steps if args.compile_steps is None else args.compile_steps,
                  p.cold_compile and not args.keep_caches) for p in plans]
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"threads={torch.get_num_threads()} loadavg={loadavg()} torch={torch.__version__}")
    startup = pay_inductor_startup()
    rows, compile_rows = [], []
    with tqdm(total=len(plans), desc="draft step", unit="shape") as bar:
        for plan in plans:
            r, c = run_pair(plan, mode, bar)
            rows += r
            compile_rows += c
            bar.update()
    for r in compile_rows:
        r["inductor_startup_s"] = round(startup, 2)
    path = append_rows(CSV_NAME, rows)
    cpath = append_rows(COMPILE_CSV, compile_rows)
    elapsed = time.perf_counter() - start
    print(f"\n{len(rows)} rows appended to {path}, {len(compile_rows)} to {cpath} "
          f"({mode}, {elapsed:.1f} s, Inductor start-up {startup:.1f} s, loadavg {loadavg()})")
    print()
    print_tables(rows, compile_rows)


if __name__ == "__main__":
    main()
