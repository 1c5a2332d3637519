"""Latency of the sparse LM head (triton / torch / inductor paths) vs the dense head.

For each row count (EAGLE-2 calls the head with 1 row, then 10 per depth; a whole
60-token tree is 60 rows) and each output (``topk``: log-softmax top-10 with ids;
``full``: the [N, V] log-probabilities), times:

- ``dense``            ``F.linear`` over the full [V, H] weight + log_softmax (+ topk), eager;
- ``dense_inductor``   the same under ``torch.compile`` (skipped with ``--no-compile``);
- ``sparse_torch``     the capturable reference (``path="torch"`` on CUDA);
- ``sparse_triton``    ``kernels/triton_sparse_head.py``;
- ``sparse_inductor``  the op decomposed for Inductor (``kernels/inductor_head.py``);
- ``observe_*``        one steady-state observe of 70 tokens (~5 new), triton / torch.

Beside each time: the memory-bandwidth floor, bytes the call must move (weight rows
read + hidden read + output written) over the bandwidth of a large device copy
measured in the same run. The L2 / LLC is flushed before every timed call (a draft's
decoder layer runs between two head calls) unless ``--warm-cache``.

``--variants [SPEC,...]`` instead times the Triton head's tile kernels side by side at
the same shapes, called directly (no op wrapper), each with its floor, its tunables and
its largest difference from the first variant (ids must match): a SPEC is ``dot`` or
``gemv`` (``triton_sparse_head.pick_tunables`` with that kernel forced) with optional
``:field=value`` overrides of ``Tunables``, e.g. ``gemv:block_r=128:merge_keys=1024``;
without a list, ``dot,gemv``. ``--gemv-max-rows`` sets the row threshold of the GEMV
kernel (``GEMV_MAX_ROWS``) for every table.

``--compile-check`` compiles the decode-path kernels for sm_90 without a GPU.
``--sync-check`` instead runs a few decode steps (observe, observe_start / observe_wait +
sparse head, triton and torch paths) under ``torch.cuda.set_sync_debug_mode("error")``: any host sync
raises (on CPU, ``--device cpu --smoke --sync-check`` runs the same steps as a smoke test;
the CPU guard against host syncs is ``tests/test_device_guards.py``).
``--fail-fast``: stop at the first failed provider (exit 1) instead of going on.

Usage::

    python bench/gpu_head_latency.py                      # CUDA, V=128256 H=4096 bf16
    python bench/gpu_head_latency.py --device cpu --smoke # tiny shapes, interpreter
    python bench/gpu_head_latency.py --variants --rows 1,2,4,8,10 --outputs topk
    python bench/gpu_head_latency.py --variants dot,gemv,gemv:block_r=32,gemv:num_warps=8
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from microspec_compile.kernels import ops  # noqa: E402
from microspec_compile.kernels.inductor_head import compile_with_decompositions  # noqa: E402
from microspec_compile.kernels.reference import observe_reference  # noqa: E402
from microspec_compile.kernels.state import VocabState  # noqa: E402
from microspec_compile.kernels.triton_observe import observe_triton  # noqa: E402

from common import emit_table, record_failure  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_state(weight, cap, active, gen) -> VocabState:
    """A vocabulary state of capacity ``cap`` with ``active`` random ids observed."""
    vocab, hidden = weight.shape
    state = VocabState.empty(vocab, hidden, cap, weight.dtype, weight.device)
    observe_reference(state, weight, torch.randperm(vocab, generator=gen)[:active].to(weight.device))
    return state


class Timer:
    """Median latency of a callable: CUDA events, or perf_counter on CPU."""

    def __init__(self, device, iters, warmup, flush_mb):
        self.device, self.iters, self.warmup = device, iters, warmup
        self.flush = torch.empty(flush_mb * 2**20 // 4, device=device) if flush_mb else None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.flush is not None:
                self.flush.zero_()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def bandwidth_gbs(device, timer_iters=10) -> float:
    """GB/s of a large device copy (read + write bytes / time)."""
    n = (1 << 28) // 4 if device.type == "cuda" else (1 << 24) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    t = Timer(device, timer_iters, 3, 0)(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def head_graph(output, k, vocab):
    """A function for fx tracing: the head op, outputs returned as a flat tuple."""
    def head(h, r, i, c):
        if output == "topk":
            top = torch.ops.microspec.sparse_topk(h, r, i, c, None, k, "log_softmax")
            return top[0], top[1]  # compile_fx wants a flat tuple of tensors
        return (torch.ops.microspec.sparse_full(h, r, i, c, None, vocab, "log_softmax"),)
    return head


def setup(args):
    """(device, dtype, generator, weight, state, timer, floor_ms, header lines) of a table."""
    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden ** 0.5).to(dtype).to(dev)
    state = make_state(weight, args.cap, args.active, gen)
    timer = Timer(dev, args.iters, args.warmup, 0 if args.warm_cache else args.flush_mb)
    bw = bandwidth_gbs(dev)
    item = weight.element_size()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor()
    lines = [f"# {platform.node()} {name} torch {torch.__version__}"
             f" V={args.vocab} H={args.hidden} CAP={args.cap} active={args.active}"
             f" {args.dtype} k={args.k} copy bandwidth {bw:.0f} GB/s"
             f" {'warm cache' if args.warm_cache else 'cache flushed'}",
             f"{'provider':<18}{'output':<7}{'rows':>5}{'ms':>10}{'floor ms':>10}{'x floor':>9}"]

    def floor_ms(weight_rows, n, out_elems):
        """Bytes the call must move (rows read, hidden read, output written) / bandwidth."""
        moved = (weight_rows * args.hidden + n * args.hidden + out_elems) * item
        return moved / (bw * 1e9) * 1e3

    return dev, dtype, gen, weight, state, timer, floor_ms, lines


def run_table(args) -> list[str]:
    dev, dtype, gen, weight, state, timer, floor_ms, lines = setup(args)
    ids, k = state.ids, args.k
    for n in args.rows:
        x = torch.randn(n, args.hidden, generator=gen).to(dtype).to(dev)
        for output in args.outputs:
            out_elems = n * (k * 2 if output == "topk" else args.vocab)

            def dense(x=x, output=output):
                logp = F.log_softmax(F.linear(x, weight).float(), -1)
                return logp.topk(k, -1) if output == "topk" else logp.to(dtype)

            def sparse(path, x=x, output=output):
                if output == "topk":
                    return ops.sparse_topk(x, state, None, k, "log_softmax", path=path)
                return ops.sparse_full(x, state, None, args.vocab, "log_softmax", path=path)

            def sparse_inductor(x=x, output=output):
                gm = torch.fx.symbolic_trace(head_graph(output, k, args.vocab))
                head_inputs = [x, state.rows, state.ids, state.count]
                compiled = compile_with_decompositions(gm, head_inputs)
                return lambda: compiled(*head_inputs)

            # name -> builder of the timed callable (builders may compile)
            providers = {"dense": lambda: dense}
            if not args.no_compile:
                providers["dense_inductor"] = lambda: torch.compile(dense, dynamic=False)
            providers["sparse_torch"] = lambda: (lambda: sparse("torch"))
            providers["sparse_triton"] = lambda: (lambda: sparse("triton"))
            if not args.no_compile:
                providers["sparse_inductor"] = sparse_inductor
            for name, build in providers.items():
                w_rows = args.vocab if name.startswith("dense") else args.active
                fl = floor_ms(w_rows, n, out_elems)
                try:
                    ms = timer(build())
                except Exception as e:  # one broken path must not hide the others
                    record_failure(lines, f"{name:<18}{output:<7}{n:>5}", e, args, width=120)
                    continue
                lines.append(f"{name:<18}{output:<7}{n:>5}{ms:>10.4f}{fl:>10.4f}{ms / fl:>9.1f}")
    # Steady-state observe: 70 tokens of which ~5 are new (the rest already active).
    toks = torch.cat([ids[:65], torch.randint(0, args.vocab, (5,), generator=gen).to(dev)])
    for name, fn in (("observe_triton", observe_triton), ("observe_torch", observe_reference)):
        st = state.clone()
        ms = timer(lambda st=st, fn=fn: fn(st, weight, toks))
        fl = floor_ms(5, 0, 0)
        lines.append(f"{name:<18}{'-':<7}{70:>5}{ms:>10.4f}{fl:>10.4f}{ms / fl:>9.1f}")
    return lines


def parse_variant(spec: str, n_rows: int, dtype, interpreted: bool):
    """``dot`` / ``gemv`` [``:field=value``...] -> the ``Tunables`` for ``n_rows`` rows."""
    from microspec_compile.kernels import triton_sparse_head as tsh

    kind, *overrides = spec.split(":")
    if kind not in ("dot", "gemv"):
        raise ValueError(f"a variant is dot or gemv[:field=value...], got {spec!r}")
    tunables = tsh.pick_tunables(n_rows, dtype, interpreted, gemv=kind == "gemv")
    fields = {f.name for f in dataclasses.fields(tsh.Tunables)} - {"gemv"}
    changes = {}
    for item in overrides:
        field, _, value = item.partition("=")
        if field not in fields:
            raise ValueError(f"{spec!r}: {field!r} is not one of {sorted(fields)}")
        changes[field] = int(value)
    return dataclasses.replace(tunables, **changes)


def run_variants(args) -> list[str]:
    """The tile kernels side by side (``--variants``): each variant's time and floor, its
    tunables, and its largest difference from the first variant's output."""
    from microspec_compile.kernels import triton_sparse_head as tsh

    dev, dtype, gen, weight, state, timer, floor_ms, lines = setup(args)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    specs = args.variants.split(",")
    lines[1] += "  max|diff|  tunables"
    head = (state.rows, state.ids, state.count, None)
    for n in args.rows:
        x = torch.randn(n, args.hidden, generator=gen).to(dtype).to(dev)
        for output in args.outputs:
            out_elems = n * (args.k * 2 if output == "topk" else args.vocab)
            fl = floor_ms(args.active, n, out_elems)
            first = None
            for spec in specs:
                tunables = parse_variant(spec, n, dtype, interpreted)
                if output == "topk":
                    def call(t=tunables):
                        return tsh.sparse_topk_triton(x, *head, args.k, "log_softmax", tunables=t)
                else:
                    def call(t=tunables):
                        return (tsh.sparse_full_triton(x, *head, args.vocab, "log_softmax",
                                                       tunables=t), None)
                label = f"triton_{spec.split(':')[0]}"
                try:
                    values, token_ids = call()
                    if first is None:
                        first = (values, token_ids)
                    elif token_ids is not None and not torch.equal(token_ids, first[1]):
                        raise AssertionError(f"other ids than {specs[0]}")
                    diff = (values.float() - first[0].float()).nan_to_num(0.0, 0.0, 0.0).abs().max()
                    ms = timer(call)
                except Exception as e:  # one broken variant must not hide the others
                    record_failure(lines, f"{label:<18}{output:<7}{n:>5}  {spec}", e, args,
                                   width=120)
                    continue
                tun = ",".join(f"{f.name}={getattr(tunables, f.name)}"
                               for f in dataclasses.fields(tunables) if f.name != "gemv")
                lines.append(f"{label:<18}{output:<7}{n:>5}{ms:>10.4f}{fl:>10.4f}{ms / fl:>9.3g}"
                             f"{float(diff):>11.2e}  {tun}")
    return lines


def sync_check(args) -> str:
    """Decode steps under set_sync_debug_mode("error"): observe, the asynchronous gather
    (observe_start / observe_wait) + the sparse head, through evictions; on CPU the same
    steps without the check (a smoke test)."""
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(1)
    # made on the device: a 128256 x 4096 randn on the host takes seconds
    weight = torch.randn(args.vocab, args.hidden, device=dev,
                         generator=torch.Generator(device=dev).manual_seed(1))
    weight = (weight / args.hidden ** 0.5).to(dtype)
    state = make_state(weight, args.cap, args.active, gen)
    steps = [(torch.randint(0, args.vocab, (70,), generator=gen).to(dev),
              torch.randn(10, args.hidden, generator=gen).to(dtype).to(dev)) for _ in range(4)]
    steps.append((torch.randperm(args.vocab, generator=gen)[:args.cap].to(dev), steps[0][1]))
    for path in ("triton", "torch"):  # the first pass also compiles the Triton kernels
        # "torch" on CUDA: the capturable references (on CPU: the CPU kernels)
        st = state.clone()  # each pass brings new ids and evicts
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for tokens, x in steps:  # the last call brings up to CAP new ids: evicts
                ops.observe(st, weight, tokens, path=path)
                ops.observe_start(st, weight, tokens, path=path)
                ops.observe_wait(x, tokens, st)
                ops.sparse_topk(x, st, None, 10, "log_softmax", path=path)
                ops.sparse_full(x, st, None, args.vocab, "softmax", path=path)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        if cuda:
            torch.cuda.synchronize()
    what = "no host sync" if cuda else "ran (no sync check on CPU)"
    return (f"{what} in observe / observe_start / observe_wait / sparse_topk / sparse_full "
            "(triton, torch): OK")


def compile_check(arch: int = 90) -> str:
    """Compile (no GPU needed, Triton's bundled ptxas) the decode-path kernels for sm_<arch>.

    Catches what the interpreter accepts and a GPU rejects (tl.dot blocks < 16, dtype
    mixes, scalar atomics). Run without TRITON_INTERPRET.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from microspec_compile.kernels import triton_observe as tobs
    from microspec_compile.kernels import triton_sparse_head as tsh

    def compile_(fn, signature, constants):
        signature = {**signature, **{name: "constexpr" for name in constants}}
        names = list(signature)
        constexprs = {(names.index(name),): value for name, value in constants.items()}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})

    i32, i64, f32, bf16 = "i32", "*i64", "*fp32", "*bf16"
    tile = dict(h_ptr=bf16, rows_ptr=bf16, ids_ptr=i64, count_ptr=i64, bias_ptr=f32, m_ptr=f32,
                s_ptr=f32, key_ptr=i64, logit_ptr=f32, out_ptr=bf16, N=i32, H=i32, CAP=i32,
                V=i32, VB=i32, T=i32, stride_hn=i32, stride_hk=i32, stride_rr=i32, stride_rk=i32,
                stride_on=i32, has_bias=i32)
    compile_(tsh._tile_kernel, tile, dict(DO_TOPK=True, FULL=1, C=16, UPCAST=False,
                                          PRECISION="tf32", BLOCK_N=16, BLOCK_R=16, BLOCK_K=128))
    for n_rows in (1, 8):  # the GEMV tile kernel's smallest and largest row blocks
        t = tsh.pick_tunables(n_rows, torch.bfloat16, interpreted=False, gemv=True)
        compile_(tsh._gemv_kernel, tile, dict(DO_TOPK=True, FULL=1, C=16, UPCAST=False,
                                              PRECISION="tf32", BLOCK_N=t.block_n,
                                              BLOCK_R=t.block_r, BLOCK_K=t.block_k))
    merge = dict(m_in=f32, s_in=f32, key_in=i64, m_out=f32, s_out=f32, key_out=i64, ids_ptr=i64,
                 count_ptr=i64, val_ptr=bf16, tok_ptr=i64, lse_ptr=f32, T_in=i32, T_out=i32,
                 SPAN=i32, K=i32, mode=i32)
    compile_(tsh._merge_kernel, merge,
             dict(DO_TOPK=True, FINAL=True, STORE_LSE=False, C_IN=16, C_OUT=16, G=256))
    assign = dict(tok_ptr="*i32", n_tok=i32, ids_ptr=i64, member_ptr=i64, ls_ptr=i64,
                  count_ptr=i64, step_ptr=i64, work_ptr=i64, CAP=i32, V=i32)
    ptx = compile_(tobs._assign_kernel, assign,
                   dict(PIN=False, BLOCK_T=1024, BLOCK_C=1024)).asm["ptx"]
    assert "atom" in ptx, "the assign kernel lost its atomics"
    copy = dict(work_ptr=i64, n_tok=i32, rows_ptr=bf16, w_ptr=bf16, H=i32, CAP=i32,
                stride_rr=i32, stride_rk=i32, stride_wv=i32, stride_wk=i32)
    compile_(tobs._copy_kernel, copy, dict(BLOCK_T=64, BLOCK_H=128))
    return f"tile (tl.dot and GEMV), merge, assign and copy kernels compiled for sm_{arch}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU check)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--cap", type=int, default=4096)
    p.add_argument("--active", type=int, default=3000)
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[1, 10, 60])
    p.add_argument("--outputs", type=lambda s: s.split(","), default=["topk", "full"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--flush-mb", type=int, default=256)
    p.add_argument("--warm-cache", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the Inductor providers")
    p.add_argument("--sync-check", action="store_true")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first failed provider (exit 1)")
    p.add_argument("--variants", nargs="?", const="dot,gemv", default=None, metavar="SPEC,...",
                   help="time the Triton tile kernels side by side (default: dot,gemv)")
    p.add_argument("--gemv-max-rows", type=int, default=None,
                   help="rows up to which the Triton head runs its GEMV tile kernel")
    p.add_argument("--compile-check", action="store_true",
                   help="compile the kernels for sm_90 (no GPU needed) and exit")
    p.add_argument("--out", type=Path, help="also append the table to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.hidden, args.cap, args.active = 1000, 64, 128, 100
        args.rows, args.outputs, args.iters, args.warmup, args.flush_mb = [1, 3], ["topk"], 2, 1, 8
    if args.compile_check:
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        print(compile_check())
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --smoke")
    if args.variants:
        try:  # a bad SPEC is an argument error, before anything runs
            [parse_variant(spec, 1, torch.float32, False) for spec in args.variants.split(",")]
        except ValueError as e:
            p.error(str(e))
    if args.gemv_max_rows is not None:
        from microspec_compile.kernels import triton_sparse_head as tsh

        tsh.GEMV_MAX_ROWS = args.gemv_max_rows
    if args.sync_check:
        lines = [sync_check(args)]
    else:
        lines = run_variants(args) if args.variants else run_table(args)
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
