"""Kernel paths of the sparse head side by side on this device (CPU: torch vs inductor).

One dense head (Linear + log_softmax + top-10) compiled three ways: plain Inductor,
microspec with ``path="torch"`` and microspec with ``path="inductor"`` (the op
decomposed into mm over the compact buffer plus a fused epilogue). Calls are
interleaved round by round; medians are reported with the ratio to dense. The
faster microspec path is the device's default (``MicrospecConfig.path="auto"``).

Usage: ``python bench/bench_paths.py [--vocab 128256 --hidden 4096 --active 3000
--rounds 15 --threads 1]``. Rows are appended to ``bench/results/paths.csv``.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn as nn

import microspec_compile as mc
from microspec_compile.vocab import ActiveVocab

from common import append_rows, loadavg


class Head(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(x).log_softmax(-1).topk(10)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--active", type=int, default=3000)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: Head(args.vocab, args.hidden).eval() for name in ("dense", "torch", "inductor")}
    compiled = {"dense": torch.compile(models["dense"])}
    for path in ("torch", "inductor"):
        weight = models[path].lm_head.weight
        vocab = ActiveVocab(weight, 4096)
        vocab.observe(torch.randperm(args.vocab)[: args.active])
        compiled[path] = torch.compile(models[path], backend=mc.backend(path=path, vocab=vocab))
    x = torch.randn(args.rows, args.hidden)
    samples = {name: [] for name in compiled}
    with torch.no_grad():
        for fn in compiled.values():
            fn(x)
            fn(x)
        for _ in range(args.rounds):
            order = list(compiled)
            random.shuffle(order)
            for name in order:
                start = time.perf_counter()
                compiled[name](x)
                samples[name].append((time.perf_counter() - start) * 1e3)
    dense = statistics.median(samples["dense"])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append({"vocab": args.vocab, "hidden": args.hidden, "rows": args.rows,
                     "active": args.active, "provider": name, "p50_ms": round(median, 3),
                     "ratio_vs_dense": round(median / dense, 4), "rounds": args.rounds,
                     "threads": torch.get_num_threads(), "loadavg": loadavg()})
    append_rows("paths.csv", rows)
    print(f"V={args.vocab} H={args.hidden} rows={args.rows} active={args.active} fp32, "
          f"threads={torch.get_num_threads()}, loadavg {loadavg()}")
    for r in rows:
        print(f"  {r['provider']:9} p50 {r['p50_ms']:9.3f} ms   x dense {r['ratio_vs_dense']:.4f}")


if __name__ == "__main__":
    main()
