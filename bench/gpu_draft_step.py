"""The compiled EAGLE-2-shaped draft step on a GPU: dense vs microspec sync vs async.

The draft is ``draft_model.Body`` (embedding -> one Llama decoder layer over a
512-position KV cache -> final norm) + ``heads.dense_head`` (LM head, log_softmax,
top-10), random weights at the chosen shape (default Llama-3-8B, bf16). One tree
step is EAGLE-2's expansion: 1 row, then 10 rows per depth, depth 6 (7 calls), the
tree selection between calls on the device. Providers, each compiled with and
without CUDA graphs (``mode="reduce-overhead"``, suffix ``+cg``):

- ``dense``      plain Inductor;
- ``ms_sync``    ``backend=microspec_compile.backend()`` (the synchronous observe, the default);
- ``ms_async``   the same with the asynchronous gather (``async_gather=True``).

Beside each median: the memory-bandwidth floor of the step, the bytes it must read
(per call: the layer's weights, the KV cache, the head rows scored: all V rows for
dense, the active ones for microspec) over the bandwidth of a large device copy
measured in the same run; the L2 is flushed before each step.

``--sync-check`` instead runs a few steps of the microspec providers under
``torch.cuda.set_sync_debug_mode("error")`` (after their warm-up): a host sync raises
(with ``--cpu-smoke``: the same steps on CPU, unchecked, a smoke test of the script).
``--fail-fast``: stop at the first failed provider (exit 1) instead of going on.

Usage::

    python bench/gpu_draft_step.py [--quick] [--out FILE]       # CUDA, Llama-3-8B shapes
    python bench/gpu_draft_step.py --sync-check --shape smollm2
    python bench/gpu_draft_step.py --cpu-smoke [--eager] [--sync-check]  # tiny, on CPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_head_latency import Timer, bandwidth_gbs  # noqa: E402

import microspec_compile as mc  # noqa: E402

from common import emit_table, record_failure  # noqa: E402
from draft_model import DEPTHS, KV_LEN, Body, tree_step  # noqa: E402
from heads import TOP_K, dense_head  # noqa: E402
from shapes import DTYPES, SHAPES, Shape  # noqa: E402

PROVIDERS = ("dense", "ms_sync", "ms_async")
TINY = Shape(1000, 64, 4, 2, 128)


def build(provider: str, cuda_graphs: bool, weight, body, args):
    """A compiled draft step for one provider (its own ``dense_head`` over the shared body)."""
    model = dense_head(weight, body).eval()
    mode = "reduce-overhead" if cuda_graphs else None
    if provider == "dense":
        backend = "eager" if args.eager else "inductor"
        return torch.compile(model, backend=backend, mode=None if args.eager else mode,
                             dynamic=False)
    config = dict(capacity=args.capacity, async_gather=provider == "ms_async")
    if args.eager:
        config["inductor"] = False
        mode = None
    return torch.compile(model, backend=mc.backend(**config), mode=mode, dynamic=False)


def step_bytes(shape: Shape, body: Body, head_rows: int, item: int) -> float:
    """Bytes one tree step must read: per call the layer, the KV cache and the head rows."""
    layer = sum(t.numel() * t.element_size() for t in body.layer.parameters())
    cache = body.layer.k_cache.numel() * item * 2
    return (DEPTHS + 1) * (layer + cache + head_rows * shape.hidden * item)


def setup(args):
    dev = torch.device(args.device)
    shape = TINY if args.cpu_smoke else SHAPES[args.shape]
    dtype = DTYPES[args.dtype]
    # one cache entry per provider and row count on the draft step's forward: above the default 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape.vocab, shape.hidden, device=dev, dtype=dtype,
                         generator=torch.Generator(device=dev).manual_seed(0))
    weight = torch.nn.Parameter(weight / shape.hidden ** 0.5, requires_grad=False)
    with torch.device(dev):  # the layer's weights and KV cache are made on the device
        body = Body(shape, dtype, weight).eval()
    # the head alone: Body wraps the same data in another Parameter (its embedding),
    # and the vocabulary belongs to the head's own weight object
    vocab = mc.vocab_of(dense_head(weight), capacity=args.capacity)
    active = min(args.active, shape.vocab)
    vocab.observe(torch.randperm(shape.vocab, generator=gen)[:active].to(dev))
    root = torch.randint(0, shape.vocab, (1, 1), generator=gen).to(dev)
    return dev, shape, dtype, weight, body, vocab, root


def run_table(args) -> list[str]:
    dev, shape, dtype, weight, body, vocab, root = setup(args)
    timer = Timer(dev, args.iters, args.warmup, 0 if dev.type != "cuda" else args.flush_mb)
    bw = bandwidth_gbs(dev)
    item = torch.empty(0, dtype=dtype).element_size()
    lines = [f"# draft step: {args.shape if not args.cpu_smoke else 'tiny'} V={shape.vocab} "
             f"H={shape.hidden} {args.dtype} KV={KV_LEN} rows 1 + {DEPTHS} x {TOP_K}, active "
             f"{vocab.size}/{args.capacity}; copy bandwidth {bw:.0f} GB/s; medians of "
             f"{args.iters}",
             f"{'provider':<14}{'ms/step':>10}{'floor ms':>10}{'x floor':>9}{'compile s':>11}"]
    with torch.no_grad():
        for cuda_graphs in graph_modes(args):
            for provider in args.providers:
                name = provider + ("+cg" if cuda_graphs else "")
                rows = shape.vocab if provider == "dense" else vocab.size
                floor = step_bytes(shape, body, rows, item) / (bw * 1e9) * 1e3
                try:
                    fn = build(provider, cuda_graphs, weight, body, args)
                    t0 = time.perf_counter()
                    tree_step(fn, root, cuda_graphs=True)  # compile (1 row and 10 rows)
                    compile_s = time.perf_counter() - t0
                    ms = timer(lambda fn=fn: tree_step(fn, root, cuda_graphs=True))
                except Exception as e:  # one broken provider must not hide the others
                    record_failure(lines, f"{name:<14}", e, args)
                    continue
                lines.append(f"{name:<14}{ms:>10.3f}{floor:>10.3f}{ms / floor:>9.1f}"
                             f"{compile_s:>11.1f}")
    skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    lines.append(f"# Inductor cudagraph skips: {skips} (0 expected on CUDA; "
                 "TORCH_LOGS=cudagraphs names the reasons)")
    return lines


def sync_check(args) -> list[str]:
    """Steps of the microspec providers under set_sync_debug_mode("error") after warm-up
    (on CPU: the same steps, unchecked)."""
    dev, shape, dtype, weight, body, vocab, root = setup(args)
    cuda = dev.type == "cuda"
    lines = []
    with torch.no_grad():
        for provider in [p for p in args.providers if p != "dense"]:
            for cuda_graphs in graph_modes(args):
                name = provider + ("+cg" if cuda_graphs else "")
                fn = build(provider, cuda_graphs, weight, body, args)
                for _ in range(3):  # compile, CUDA-graph warm-up, record
                    tree_step(fn, root, cuda_graphs=True)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    for _ in range(3):
                        tree_step(fn, root, cuda_graphs=True)
                    lines.append(f"{name}: no host sync in 3 compiled tree steps: OK" if cuda
                                 else f"{name}: 3 compiled tree steps ran (CPU: unchecked)")
                except Exception as e:
                    lines.append(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0]}")
                    if args.fail_fast:
                        emit_table(lines, args.out)
                        raise
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode(0)
                if cuda:
                    torch.cuda.synchronize()
    return lines


def graph_modes(args) -> list[bool]:
    """Whether each run uses CUDA graphs: both, or only one (``--no-cuda-graphs``,
    ``--cuda-graphs-only``)."""
    if args.no_cuda_graphs:
        return [False]
    return [True] if args.cuda_graphs_only else [False, True]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--active", type=int, default=3000, help="ids observed before timing")
    p.add_argument("--providers", type=lambda s: s.split(","), default=list(PROVIDERS))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--flush-mb", type=int, default=256)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--cuda-graphs-only", action="store_true",
                   help="only the CUDA-graph (mode reduce-overhead) runs")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first failed provider (exit 1)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--sync-check", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, fp32, on CPU")
    p.add_argument("--eager", action="store_true", help="no Inductor (fast smoke test)")
    p.add_argument("--out", type=Path, help="also append the lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = 10, 2
    if args.cpu_smoke:
        args.device, args.dtype, args.iters, args.warmup = "cpu", "fp32", 2, 1
        args.capacity, args.active, args.no_cuda_graphs = 256, 100, True
    bad = set(args.providers) - set(PROVIDERS)
    if bad:
        p.error(f"unknown providers {sorted(bad)}; choose from {PROVIDERS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke")
    if args.sync_check and args.device != "cuda" and not args.cpu_smoke:
        sys.exit("--sync-check needs a CUDA device (or --cpu-smoke for a smoke run)")
    lines = sync_check(args) if args.sync_check else run_table(args)
    if not emit_table(lines, args.out):
        sys.exit(1)


if __name__ == "__main__":
    main()
