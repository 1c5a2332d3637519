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

import math
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch._inductor.config
from tqdm import tqdm

import microspec_compile
from microspec_compile.apps.measure import interleaved_rounds
from microspec_compile.vocab import ActiveVocab

from common import Flusher, append_rows, loadavg, mode_parser, percentiles
from draft_model import (
    DEPTHS,
    KV_LEN,
    Body,
    CountingBackend,
    LayerOnly,
    fx_cache_delta,
    inductor_backend,
    layer_step,
    pay_inductor_startup,
    tree_step,
)
from heads import TOP_K, dense_head, subset_head
from shapes import DTYPES, SHAPES, random_weight

CSV_NAME = "draft_step.csv"
COMPILE_CSV = "compile.csv"
CAPACITY = 4096
ACTIVE = 3000
NEW_PER_STEP = 60
REFILL_EVERY = 16
FRSPEC_SIZE = 32768
TARGET_RATIO = 0.37
MIN_COMPILE_STEPS = 200
COMPARED = ("inductor_dense", "microspec")  # compiled with Inductor's caches off (cold)


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


# --------------------------------------------------------------------- the run

def run_pair(plan: Plan, mode: str, bar) -> tuple[list, list]:
    shape_name, dname = plan.shape, plan.dtype
    s = SHAPES[shape_name]
    dtype = DTYPES[dname]
    torch._dynamo.reset()
    torch.manual_seed(0)
    bar.set_postfix_str(f"{shape_name} {dname}: weights")
    head_w = random_weight(s.vocab, s.hidden, seed=0).to(dtype)
    embed_w = head_w if s.tied else random_weight(s.vocab, s.hidden, seed=1).to(dtype)
    body = Body(s, dtype, embed_w).eval()
    with torch.no_grad():
        for p in body.layer.parameters():
            if p.dim() == 2:
                p.uniform_(-1 / math.sqrt(p.shape[1]), 1 / math.sqrt(p.shape[1]))
    dense = dense_head(head_w if not s.tied else body.embed_tokens.weight, body).eval()
    gen = torch.Generator().manual_seed(2)
    subset = torch.randperm(s.vocab, generator=gen)[:FRSPEC_SIZE].sort().values
    param = dense.scorer.lm_head.weight
    frspec = subset_head(param, subset, body).eval()
    layer_only = LayerOnly(body).eval()
    vocab = ActiveVocab(param, CAPACITY)
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
        "microspec": CountingBackend(microspec_compile.backend(vocab=vocab)),
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

    flush = Flusher(mib=64)
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
                                "disabled" if cold else "enabled", fx_cache_delta(fx0))
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
        rounds = plan.rounds

        def progress(done):
            if (done - 1) % 5 == 0:
                bar.set_postfix_str(f"{shape_name} {dname}: round {done}/{rounds}")

        samples = interleaved_rounds(timed, min_rounds=rounds, rng=random.Random(0),
                                     flush=flush, on_round=progress)
        steps_done = {k: 2 + rounds for k in backends}
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
    parser = mode_parser(__doc__, {
        "smoke": "smollm2 fp32, a few rounds (for tests)",
        "quick": "smollm2 fp32 (+ compile check) and llama3-8b bf16 (default)",
        "full": "every shape in fp32 and bf16"})
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
