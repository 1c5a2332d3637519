"""Latency of the LM head alone: dense vs a fixed FR-Spec subset vs the microspec backend.

The head is ``Linear(H, V, bias=False) -> log_softmax -> topk(10)`` (what EAGLE calls),
with random weights of real shapes (bytes and FLOPs are what matter here).

Providers (one module, interleaved in shuffled order every round)
----------------------------------------------------------------
- ``eager_dense``: the dense module, uncompiled;
- ``inductor_dense``: the same module under ``torch.compile`` (default backend);
- ``inductor_frspec32k``: a compact ``Linear(H, 32768)`` over a fixed 32768-row
  subset + an index map back to token ids (FR-Spec style), under ``torch.compile``;
- ``microspec@N``: the *same dense module* compiled with the microspec backend
  (capacity 4096), its active vocabulary filled with N random token ids
  (N = 1000, 3000, 4096 = capacity); the vocabulary is refilled (untimed) before
  each timed call, so it changes under the compiled graph all the time;
- ``copy``: a 256 MiB tensor copy, and ``read``: a ``sum()`` over it, timed in the
  same rounds; their medians give the memory bandwidth (copy: read + write bytes /
  time; read: bytes / time) of each configuration;
- ``bw_floor@N`` rows: the time to read the bytes the head must read
  (N * H * itemsize + rows * H * itemsize) at the larger of the two bandwidths
  (a copy alone underestimates the read rate a GEMV reaches).

By default the last-level cache is flushed (64 MiB write) before every timed call,
as a draft's decoder layer would; ``--warm-cache`` skips that.

Usage: ``python bench/bench_head.py [--smoke | --quick | --full] [--shapes ..]
[--rows ..] [--dtypes ..]`` (default --quick). Rows are appended to
``bench/results/head.csv``.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import microspec_compile
from microspec_compile.apps.measure import interleaved_rounds
from microspec_compile.vocab import ActiveVocab

from common import Flusher, append_rows, loadavg, mode_parser, percentiles
from heads import TOP_K, dense_head, subset_head
from shapes import DTYPES, SHAPES, random_weight

CSV_NAME = "head.csv"
CAPACITY = 4096
ACTIVE_SIZES = (1000, 3000, CAPACITY)
FRSPEC_SIZE = 32768
HEADLINE = {"shape": "llama3-8b", "dtype": "fp32", "rows": 1, "provider": "microspec@3000"}
TARGET_RATIO = 0.035

MODES = {
    # min / max rounds and a time budget (s) per (shape, dtype, rows) configuration
    "smoke": {"shapes": ("smollm2",), "rows": (1,), "dtypes": ("fp32",),
              "min_rounds": 3, "max_rounds": 5, "budget_s": 1.0},
    "quick": {"shapes": ("llama3-8b", "smollm2"), "rows": (1, 10), "dtypes": ("fp32", "bf16"),
              "min_rounds": 11, "max_rounds": 60, "budget_s": 6.0},
    "full": {"shapes": tuple(SHAPES), "rows": (1, 10, 60), "dtypes": ("fp32", "bf16"),
             "min_rounds": 21, "max_rounds": 150, "budget_s": 20.0},
}


# --------------------------------------------------------------------- helpers

@dataclass
class Provider:
    name: str
    fn: object                 # callable(hidden) -> (values, ids)
    active_rows: int
    setup: object = None       # untimed callable run before each timed call


def time_rounds(providers: list[Provider], make_input, cfg: dict, flush: Flusher,
                rng: random.Random, bar=None) -> dict[str, list[float]]:
    """Interleaved rounds (``apps.measure.interleaved_rounds``), a fresh input before each call (ms)."""
    current = {}

    def prepare(p: Provider) -> None:
        if p.setup is not None:
            p.setup()
        current["x"] = make_input()

    return interleaved_rounds(
        {p.name: (lambda p=p: p.fn(current["x"])) for p in providers},
        min_rounds=cfg["min_rounds"], max_rounds=cfg["max_rounds"], budget_s=cfg["budget_s"],
        rng=rng, flush=flush, setup={p.name: (lambda p=p: prepare(p)) for p in providers},
        on_round=None if bar is None else (lambda n: bar.set_postfix_str(f"round {n}")))


def check_microspec(ms_fn, vocab, weight: torch.Tensor, x: torch.Tensor) -> str:
    """Compiled microspec top-k vs a reference over the active rows: ids in S, values close."""
    values, ids = ms_fn(x)
    if not bool(vocab.contains(ids).all()):
        return "FAIL:ids-outside-S"
    active = vocab.active_ids()
    ref = torch.log_softmax(x.float() @ weight[active].float().t(), dim=-1)
    ref_values = torch.topk(ref, TOP_K, dim=-1).values
    tol = 1e-3 if x.dtype == torch.float32 else 0.1
    err = (values.float() - ref_values).abs().max().item()
    return "ok" if err <= tol else f"FAIL:max_err={err:.3g}"


# --------------------------------------------------------------------- the run

def run_shape(shape: str, dtypes, rows_list, cfg: dict, mode: str, flush: Flusher,
              bar) -> list[dict]:
    vocab_size, hidden = SHAPES[shape].vocab, SHAPES[shape].hidden
    master = random_weight(vocab_size, hidden, seed=0)
    gen = torch.Generator().manual_seed(1)
    subset = torch.randperm(vocab_size, generator=gen)[:FRSPEC_SIZE].sort().values
    pool = torch.randperm(vocab_size, generator=gen)[:CAPACITY]  # nested active sets
    rows_out = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        weight = master if dtype == torch.float32 else master.to(dtype)
        torch._dynamo.reset()
        dense = dense_head(weight).eval()
        frspec = subset_head(weight, subset).eval()
        param = dense.lm_head.weight
        vocab = ActiveVocab(param, CAPACITY)
        ms_backend = microspec_compile.backend(vocab=vocab)
        ind_dense = torch.compile(dense)
        ind_frspec = torch.compile(frspec)
        ms_dense = torch.compile(dense, backend=ms_backend)
        copy_src = torch.empty(64 * 2**20)
        copy_dst = torch.empty_like(copy_src)
        copy_src.fill_(1.0)
        state = {"n": None}

        def set_active(n: int) -> None:
            if state["n"] != n:
                vocab.reset()
                vocab.observe(pool[:n])
                state["n"] = n

        providers = [
            Provider("eager_dense", dense, vocab_size),
            Provider("inductor_dense", ind_dense, vocab_size),
            Provider(f"inductor_frspec{FRSPEC_SIZE // 1024}k", ind_frspec, FRSPEC_SIZE),
            *(Provider(f"microspec@{n}", ms_dense, n, setup=(lambda n=n: set_active(n)))
              for n in ACTIVE_SIZES),
            Provider("copy", lambda _x: copy_dst.copy_(copy_src), 0),
            Provider("read", lambda _x: copy_src.sum(), 0),
        ]
        for rows in rows_list:
            bar.set_description(f"head {shape} {dname} rows={rows}")
            gen_x = torch.Generator().manual_seed(rows)

            def make_input(rows=rows, gen_x=gen_x):
                return torch.randn(rows, hidden, generator=gen_x).to(dtype)

            compile_s = {}
            with torch.no_grad():
                graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                for p in providers:  # warm-up: compiles (timed), then a second call
                    if p.setup is not None:
                        p.setup()
                    t0 = time.perf_counter()
                    p.fn(make_input())
                    compile_s[p.name] = time.perf_counter() - t0
                    p.fn(make_input())
                set_active(3000)
                check = check_microspec(ms_dense, vocab, param, make_input())
                graphs1 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                samples = time_rounds(providers, make_input, cfg, flush, random.Random(rows), bar)
                graphs2 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            nbytes = copy_src.numel() * copy_src.element_size()
            copy_bw = 2 * nbytes / (statistics.median(samples["copy"]) / 1e3)  # read + write, B/s
            read_bw = nbytes / (statistics.median(samples["read"]) / 1e3)      # sum(): read only
            bandwidth = max(copy_bw, read_bw)  # the fastest streaming rate seen: a lower bound
            itemsize = weight.element_size()
            base = statistics.median(samples["inductor_dense"])
            common_cols = {
                "mode": mode, "shape": shape, "vocab_size": vocab_size, "hidden": hidden,
                "dtype": dname, "rows": rows, "threads": torch.get_num_threads(),
                "cache": "cold" if flush.buf is not None else "warm",
                "copy_bw_gbs": round(copy_bw / 1e9, 2), "read_bw_gbs": round(read_bw / 1e9, 2),
                "floor_bw_gbs": round(bandwidth / 1e9, 2), "loadavg": loadavg(),
            }
            for p in providers:
                if p.name in ("copy", "read"):
                    continue
                p20, p50, p80 = percentiles(samples[p.name])
                floor = (p.active_rows + rows) * hidden * itemsize / bandwidth * 1e3
                rows_out.append({
                    **common_cols, "provider": p.name, "active_rows": p.active_rows,
                    "n_samples": len(samples[p.name]), "p20_ms": round(p20, 4),
                    "p50_ms": round(p50, 4), "p80_ms": round(p80, 4),
                    "ratio_vs_inductor_dense": round(p50 / base, 4),
                    "floor_ms": round(floor, 4), "first_call_s": round(compile_s[p.name], 3),
                    "graphs_during_timing": graphs2 - graphs1,
                    "graphs_compiled": graphs1 - graphs0,
                    "check": check if p.name.startswith("microspec") else "",
                })
            for n in (*ACTIVE_SIZES, FRSPEC_SIZE, vocab_size):
                floor = (n + rows) * hidden * itemsize / bandwidth * 1e3
                rows_out.append({
                    **common_cols, "provider": f"bw_floor@{n}", "active_rows": n, "n_samples": 0,
                    "p20_ms": round(floor, 4), "p50_ms": round(floor, 4), "p80_ms": round(floor, 4),
                    "ratio_vs_inductor_dense": round(floor / base, 4), "floor_ms": round(floor, 4),
                    "first_call_s": "", "graphs_during_timing": "", "graphs_compiled": "",
                    "check": "",
                })
            bar.update()
        del dense, frspec, ind_dense, ind_frspec, ms_dense, vocab, param, weight, providers
        torch._dynamo.reset()
    return rows_out


def print_table(rows: list[dict]) -> None:
    header = (f"{'shape':<11} {'dtype':<4} {'rows':>4} {'provider':<20} {'active':>6} "
              f"{'p20_ms':>9} {'p50_ms':>9} {'p80_ms':>9} {'x_ind':>7} {'floor_ms':>8} "
              f"{'check':<5}")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        key = (r["shape"], r["dtype"], r["rows"])
        if last is not None and key != last:
            print()
        last = key
        if r["provider"].startswith("bw_floor"):
            continue
        print(f"{r['shape']:<11} {r['dtype']:<4} {r['rows']:>4} {r['provider']:<20} "
              f"{r['active_rows']:>6} {r['p20_ms']:>9.3f} {r['p50_ms']:>9.3f} {r['p80_ms']:>9.3f} "
              f"{r['ratio_vs_inductor_dense']:>7.4f} {r['floor_ms']:>8.3f} {r['check']:<5}")
    print("(x_ind: p50 / p50 of inductor_dense in the same configuration; floor_ms: "
          "(active rows + rows) * H * itemsize / max(copy, read) bandwidth)")
    for key in dict.fromkeys((r["shape"], r["dtype"], r["rows"]) for r in rows):
        r = next(x for x in rows if (x["shape"], x["dtype"], x["rows"]) == key)
        print(f"  {key[0]} {key[1]} rows={key[2]}: copy {r['copy_bw_gbs']} GB/s (read+write), "
              f"read {r['read_bw_gbs']} GB/s, loadavg {r['loadavg']}")


def report_headline(rows: list[dict]) -> None:
    for r in rows:
        if all(r[k] == v for k, v in HEADLINE.items()):
            verdict = "meets" if r["ratio_vs_inductor_dense"] <= TARGET_RATIO else "MISSES"
            print(f"headline: {r['provider']} / inductor_dense at {r['shape']} {r['dtype']} "
                  f"rows={r['rows']}: {r['p50_ms']:.3f} ms / "
                  f"{r['p50_ms'] / r['ratio_vs_inductor_dense']:.3f} ms = "
                  f"{r['ratio_vs_inductor_dense']:.4f} ({verdict} the target <= {TARGET_RATIO}; "
                  f"bandwidth floor of 3000 rows {r['floor_ms']:.3f} ms at "
                  f"{r['floor_bw_gbs']} GB/s)")
            return
    print("headline configuration (llama3-8b fp32 rows=1) not in this run")


def main(argv: list[str] | None = None) -> None:
    parser = mode_parser(__doc__, {
        "smoke": "smallest shape, fp32, 1 row, a few rounds (seconds; for tests)",
        "quick": "llama3-8b and smollm2, rows 1 and 10, fp32 + bf16 (default)",
        "full": "every shape, rows 1 / 10 / 60, fp32 + bf16"})
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), help="filter shapes")
    parser.add_argument("--rows", nargs="+", type=int, help="filter / set row counts")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="filter dtypes")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="do not flush the last-level cache before timed calls")
    args = parser.parse_args(argv)
    mode = args.mode or "quick"
    cfg = dict(MODES[mode])
    shapes = args.shapes or cfg["shapes"]
    rows_list = args.rows or cfg["rows"]
    dtypes = args.dtypes or cfg["dtypes"]
    flush = Flusher(not args.warm_cache)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"threads={torch.get_num_threads()} loadavg={loadavg()} torch={torch.__version__}")
    rows = []
    with tqdm(total=len(shapes) * len(dtypes) * len(rows_list), desc="head", unit="cfg") as bar:
        for shape in shapes:
            rows += run_shape(shape, dtypes, rows_list, cfg, mode, flush, bar)
    path = append_rows(CSV_NAME, rows)
    elapsed = time.perf_counter() - start
    print(f"\n{len(rows)} rows appended to {path} ({mode}, {elapsed:.1f} s, loadavg {loadavg()})")
    report_headline(rows)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
