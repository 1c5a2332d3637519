"""Plots of the benchmark CSVs (matplotlib, Agg backend).

Reads ``head.csv``, ``draft_step.csv`` and ``coverage.csv`` from the results folder
(``bench/results/`` or ``$MICROSPEC_RESULTS_DIR``, or ``--results DIR``) and writes,
next to them:

- ``head_latency.png``: LM-head p50 latency (p20-p80 bars) vs active-vocabulary
  size for microspec, with the eager / Inductor dense and FR-Spec 32k lines and
  the memory-bandwidth floor, one panel per (shape, dtype, rows, threads);
- ``draft_step_breakdown.png``: the EAGLE-2 draft step per provider, stacked as
  layer (embedding + decoder layer + norm), head (+ top-k, tree selection and, for
  microspec, its in-graph observes) and microspec's per-step observe of 60 new ids;
- ``coverage.png``: coverage vs mean active-vocabulary size per policy, one panel
  per tokenizer, with the target (>= 0.97 at <= 3k).

A file whose CSV is missing or empty is skipped. When a CSV holds several runs of a
configuration (same thread count), the latest (by ``date``) is plotted.

Usage: ``python bench/plot.py [--results DIR]``.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

from microspec_compile.analysis.plotting import grid, pyplot, save_figure
from microspec_compile.analysis.results import results_dir

plt = pyplot()


def read_csv(path: Path) -> list[dict]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def num(value, default=math.nan) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def latest(rows: list[dict], key_cols: tuple) -> dict[tuple, list[dict]]:
    """Rows grouped by ``key_cols``, keeping only each group's latest ``date``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(c, "") for c in key_cols)].append(r)
    out = {}
    for key, group in groups.items():
        newest = max(r.get("date", "") for r in group)
        out[key] = [r for r in group if r.get("date", "") == newest]
    return out


def plot_head(rows: list[dict], out: Path) -> Path | None:
    groups = latest(rows, ("shape", "dtype", "rows", "threads"))
    if not groups:
        return None
    order = sorted(groups, key=lambda k: (k[0], k[1], int(num(k[2], 0)), k[3]))
    fig, axes = grid(len(order))
    lines = {"eager_dense": ("tab:gray", ":"), "inductor_dense": ("tab:red", "-"),
             "inductor_frspec32k": ("tab:orange", "--")}
    for ax, key in zip(axes, order):
        group = groups[key]
        ms = sorted((r for r in group if r["provider"].startswith("microspec@")),
                    key=lambda r: num(r["active_rows"]))
        if ms:
            x = [num(r["active_rows"]) for r in ms]
            y = [num(r["p50_ms"]) for r in ms]
            lo = [max(0.0, yi - num(r["p20_ms"])) for yi, r in zip(y, ms)]
            hi = [max(0.0, num(r["p80_ms"]) - yi) for yi, r in zip(y, ms)]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", color="tab:blue", capsize=3,
                        label="microspec (p50, p20-p80)")
        for r in group:
            if r["provider"] in lines:
                color, style = lines[r["provider"]]
                ax.axhline(num(r["p50_ms"]), color=color, linestyle=style,
                           label=f"{r['provider']} {num(r['p50_ms']):.1f} ms")
        floor = sorted((r for r in group if r["provider"].startswith("bw_floor@")),
                       key=lambda r: num(r["active_rows"]))
        if floor:
            bw = floor[0].get("floor_bw_gbs") or floor[0].get("copy_bw_gbs", "?")
            ax.plot([num(r["active_rows"]) for r in floor], [num(r["p50_ms"]) for r in floor],
                    color="black", linewidth=0.8, linestyle="-.",
                    label=f"bandwidth floor ({bw} GB/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("active rows scored")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{key[0]} {key[1]} rows={key[2]}, {key[3]} thr", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    machine = groups[order[0]][0].get("machine", "")
    return save_figure(fig, out / "head_latency.png",
                       f"LM head: latency vs active vocabulary ({machine})")


def plot_draft(rows: list[dict], out: Path) -> Path | None:
    groups = latest(rows, ("shape", "dtype", "threads"))
    if not groups:
        return None
    order = sorted(groups)
    fig, axes = grid(len(order), width=5.0, height=4.0)
    providers = ("inductor_dense", "inductor_frspec32k", "microspec")
    for ax, key in zip(axes, order):
        by_name = {r["provider"]: r for r in groups[key]}
        names = [p for p in providers if p in by_name]
        layer = [num(by_name[p]["layer_ms"]) for p in names]
        head = [max(0.0, num(by_name[p]["p50_ms"]) - num(by_name[p]["layer_ms"])) for p in names]
        obs = [num(by_name[p].get("observe60_ms"), 0.0) if p == "microspec" else 0.0 for p in names]
        xs = range(len(names))
        ax.bar(xs, layer, color="tab:gray", label="layer (embed + decoder + norm)")
        ax.bar(xs, head, bottom=layer, color="tab:red",
               label="head + top-k + selection (+ in-graph observe)")
        ax.bar(xs, obs, bottom=[a + b for a, b in zip(layer, head)], color="tab:green",
               label="observe 60 new ids / step")
        for x, p in zip(xs, names):
            total = layer[x] + head[x] + obs[x]
            ratio = num(by_name[p].get("ratio_plus_observe") or by_name[p].get("ratio_vs_dense"))
            ax.text(x, total, f"{total:.1f} ms\nx{ratio:.3f}", ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([p.replace("inductor_", "") for p in names], fontsize=8)
        ax.set_ylabel("step latency, p50 (ms)")
        ax.set_title(f"{key[0]} {key[1]}, {key[2]} thr: 1 + 6x10 rows", fontsize=10)
        tops = [a + b + c for a, b, c in zip(layer, head, obs)]
        if tops and max(tops) > 0:
            ax.set_ylim(0, max(tops) * 1.25)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    first = groups[order[0]][0]
    return save_figure(fig, out / "draft_step_breakdown.png",
                       f"EAGLE-2 draft step breakdown\n({first.get('machine', '')})")


def plot_coverage(rows: list[dict], out: Path) -> Path | None:
    groups = latest(rows, ("tokenizer", "dataset", "policy"))
    if not groups:
        return None
    tokenizers = sorted({k[0] for k in groups})
    fig, axes = grid(len(tokenizers), width=5.5, height=4.2)
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for ax, tok in zip(axes, tokenizers):
        keys = [k for k in groups if k[0] == tok]
        datasets = sorted({k[1] for k in keys})
        policies = list(dict.fromkeys(k[2] for k in keys))
        colors = {d: f"C{i}" for i, d in enumerate(datasets)}
        for d in datasets:
            pts = [(num(groups[k][0]["mean_size"]), num(groups[k][0]["coverage"]), k[2])
                   for k in keys if k[1] == d]
            pts.sort(key=lambda p: policies.index(p[2]))
            ctx = [p for p in pts if p[2].startswith("context")]
            ax.plot([p[0] for p in ctx], [p[1] for p in ctx], color=colors[d], alpha=0.5)
            for x, y, pol in pts:
                marker = markers[policies.index(pol) % len(markers)]
                ax.scatter(x, y, color=colors[d], marker=marker, s=30, zorder=3)
        ax.axhline(0.97, color="black", linestyle="--", linewidth=0.8)
        ax.axvline(3000, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("mean active-vocabulary size")
        ax.set_ylabel("coverage (accepted tokens in S)")
        ax.set_title(f"{tok}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        handles = [plt.Line2D([], [], color=colors[d], marker="o", linestyle="-", label=d)
                   for d in datasets]
        handles += [plt.Line2D([], [], color="black", marker=markers[i % len(markers)],
                               linestyle="", label=p) for i, p in enumerate(policies)]
        ax.legend(handles=handles, fontsize=6.5, loc="lower right")
    return save_figure(fig, out / "coverage.png",
                       "Coverage vs active-vocabulary size per policy\n(target: >= 0.97 at <= 3k)")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="folder of the CSVs (default: results_dir())")
    args = parser.parse_args(argv)
    folder = args.results or results_dir()
    written = []
    for csv_name, fn in (("head.csv", plot_head), ("draft_step.csv", plot_draft),
                         ("coverage.csv", plot_coverage)):
        rows = read_csv(folder / csv_name)
        path = fn(rows, folder) if rows else None
        status = f"{len(rows)} rows -> {path}" if path else "missing or empty, skipped"
        print(f"{csv_name}: {status}")
        if path:
            written.append(path)
    return written


if __name__ == "__main__":
    main()
