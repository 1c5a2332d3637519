"""Triton sparse LM head: one pass over the compact rows, top-k and full-vocabulary outputs.

Semantics are those of ``reference.sparse_topk_reference`` / ``sparse_full_reference``
(state layout in ``reference.py``). The active row count is read **on the device**: a
program whose row tile starts at or past ``count`` returns at once, and partial results
of such tiles are masked by the reducers, so nothing here synchronises with the host.

Kernels (launched in this order, all on the current stream)::

    _fill_kernel    out[N, V] = fill                       (full output only)
    _tile_kernel    grid (N / BLOCK_N, CAP / BLOCK_R): logits of one row tile as
                    tl.dot tiles (BLOCK_N >= 16), fp32 accumulation, bias gathered
                    through ids, -inf past count; per tile: max m and sum-exp s (online
                    softmax partials), the top C candidates packed as int64 keys, and
                    the logits themselves (scattered to out for raw logits, or to a
                    [N, CAP] scratch): ``_tile_outputs``, shared with
    _gemv_kernel    the same for few rows (N <= GEMV_MAX_ROWS) without tl.dot: a
                    [BLOCK_R, BLOCK_K] weight tile loaded once times BLOCK_N = 1..8
                    hidden rows by broadcast, summed over K in fp32
    _merge_kernel   grid (N, T / G): merges G tiles' (m, s, keys) into one; repeated
                    until one entry is left, the last call maps compact indices back
                    through ids and normalises (log-sum-exp L = m + log s)
    _scatter_kernel grid (N / BLOCK_N, CAP / BLOCK_S): normalised scratch logits to
                    out[n, ids[j]] (softmax / log-softmax full output only)

A top-k key packs an fp32 logit and its compact row index into one int64 whose signed
order is (logit, -row): float bits made order-preserving in the high word, ``2^31-1-row``
in the low word, so ``tl.topk`` over keys is a top-k over logits that prefers the lower row
on ties. Masked entries get ``_KEY_MIN`` whose row decodes to >= count, so they come out
as value ``-inf`` (0 for softmax) and id ``-1`` like the reference.

The tile kernel and its blocks, and the keys per merge program, are :class:`Tunables`
chosen per call by :func:`pick_tunables` (N, dtype, interpreted).

Launches per call: top-k 1 + merge levels (a level per factor of ``merge_keys / C`` tiles:
one up to 4096 keys per row after tl.dot tiles, e.g. 256 tiles of 16 candidates; after
GEMV tiles 512, so 3000 rows in 64-row tiles take two); full raw logits 2 (fill + tile);
full probabilities or log-probabilities 3 + merge levels (fill, tile, merges, scatter).

Differences from the reference, all on degenerate input: with count 0 the values are the
fill (the reference's softmax of an all -inf row is NaN); live rows always rank above
inactive ones, even when a live probability underflows to the 0 of the inactive rows
(torch.topk may then pick either).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from .reference import sparse_topk_reference

_MODES = {"none": 0, "softmax": 1, "log_softmax": 2}
_KEY_MIN = -(2**63)
_KEY_MIN_C = tl.constexpr(_KEY_MIN)
# Test hook: when True, every buffer the launchers allocate starts as NaN (floats) or
# _KEY_MIN (ints) instead of torch.empty garbage, so an element a kernel forgets to
# write (or a reducer that reads a skipped tile unmasked) shows up in the results.
POISON = False
# Keys merged by one program of _merge_kernel (G tiles x C candidates) after tl.dot tiles.
_MERGE_KEYS = 4096
# Up to GEMV_MAX_ROWS hidden rows run _gemv_kernel (no tl.dot, whose 16-row minimum
# wastes 15 of 16 rows for one hidden row). Module constants, read at each call: the
# GPU bench may set them. Untuned on a GPU.
GEMV_MAX_ROWS = 8
GEMV_BLOCK_R = 64  # weight rows per GEMV program on a GPU (interpreted: 32)
GEMV_PRODUCTS = 4096  # BLOCK_N * BLOCK_R * BLOCK_K per K step: bounds registers (sm_90:
# ptxas gives 141 / 96 / 72 / 80 registers, no spill, for 1 / 2 / 4 / 8 bf16 rows)
GEMV_MERGE_KEYS = 512  # keys per merge program after GEMV tiles: a merge over programs
_MAX_K = 64


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _alloc(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else _KEY_MIN
    return torch.full(shape, fill, dtype=dtype, device=device)


# Sizes and flags that vary from call to call are plain (unspecialised) arguments, so a
# GPU compiles few variants: do_not_specialize drops Triton's ==1 / %16 specialisation.
@triton.jit(do_not_specialize=["N", "V", "fill"])
def _fill_kernel(out_ptr, N, V, stride_n, fill, BLOCK_V: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    val = (tl.zeros([BLOCK_V], tl.float32) + fill).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + n * stride_n + cols, val, mask=cols < V)


@triton.jit
def _tile_outputs(
    acc, n, r, pid_t, count, ids_ptr, bias_ptr, m_ptr, s_ptr, key_ptr, logit_ptr, out_ptr,
    N, CAP, V, VB, T, stride_on, has_bias,
    DO_TOPK: tl.constexpr, FULL: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """What both tile kernels do with their fp32 products ``acc [BLOCK_N, BLOCK_R]``."""
    n_ok = n < N
    live = r < count
    tok = tl.load(ids_ptr + r, mask=live, other=V)
    bias_on = (tl.zeros([BLOCK_R], tl.int32) + has_bias) != 0  # a vector mask (interpreter)
    b = tl.load(bias_ptr + tl.minimum(tok, VB - 1), mask=live & bias_on, other=0.0)
    acc = acc + b.to(tl.float32)[None, :]
    valid = n_ok[:, None] & live[None, :]
    logits = tl.where(live[None, :], acc, float("-inf"))
    # Online-softmax partials (tile max, sum of exp), a few flops next to the GEMM.
    m = tl.max(logits, axis=1)
    s = tl.sum(tl.exp(logits - m[:, None]), axis=1)
    tl.store(m_ptr + n * T + pid_t, m, mask=n_ok)
    tl.store(s_ptr + n * T + pid_t, s, mask=n_ok)
    if DO_TOPK:
        bits = logits.to(tl.int32, bitcast=True)
        hi = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = (hi << 32) | (2147483647 - r.to(tl.int64))[None, :]
        key = tl.where(valid, key, _KEY_MIN_C)
        if C == 1:  # argmax: a plain max reduction, no bitonic network
            top = tl.max(key, axis=1, keep_dims=True)
        else:
            top = tl.topk(key, C)
        c = tl.arange(0, C)
        tl.store(key_ptr + n[:, None] * (T * C) + pid_t * C + c[None, :], top, mask=n_ok[:, None])
    if FULL == 1:
        tl.store(logit_ptr + n[:, None] * CAP + r[None, :], logits, mask=valid)
    if FULL == 2:
        tl.store(out_ptr + n[:, None] * stride_on + tok[None, :],
                 logits.to(out_ptr.dtype.element_ty), mask=valid & (tok[None, :] < V))


# The two tile kernels share their signature (``_launch`` passes the same arguments).
@triton.jit(do_not_specialize=["N", "H", "CAP", "V", "VB", "T", "has_bias"])
def _tile_kernel(
    h_ptr, rows_ptr, ids_ptr, count_ptr, bias_ptr,
    m_ptr, s_ptr, key_ptr, logit_ptr, out_ptr,
    N, H, CAP, V, VB, T,
    stride_hn, stride_hk, stride_rr, stride_rk, stride_on, has_bias,
    DO_TOPK: tl.constexpr,
    FULL: tl.constexpr,  # 0: no full output, 1: logits to scratch [N, CAP], 2: logits to out
    C: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_t * BLOCK_R >= count:
        return  # tile entirely past the active rows: reducers mask it by count
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r = pid_t * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + kk
        h = tl.load(h_ptr + n[:, None] * stride_hn + k[None, :] * stride_hk,
                    mask=(n < N)[:, None] & (k[None, :] < H), other=0.0)
        w = tl.load(rows_ptr + r[None, :] * stride_rr + k[:, None] * stride_rk,
                    mask=(r < count)[None, :] & (k[:, None] < H), other=0.0)
        if UPCAST:  # interpreter: its bf16 dot is wrong; also any non-fp16/bf16/fp32 input
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    _tile_outputs(acc, n, r, pid_t, count, ids_ptr, bias_ptr, m_ptr, s_ptr, key_ptr, logit_ptr,
                  out_ptr, N, CAP, V, VB, T, stride_on, has_bias, DO_TOPK, FULL, C, BLOCK_R)


@triton.jit(do_not_specialize=["N", "H", "CAP", "V", "VB", "T", "has_bias"])
def _gemv_kernel(
    h_ptr, rows_ptr, ids_ptr, count_ptr, bias_ptr,
    m_ptr, s_ptr, key_ptr, logit_ptr, out_ptr,
    N, H, CAP, V, VB, T,
    stride_hn, stride_hk, stride_rr, stride_rk, stride_on, has_bias,
    DO_TOPK: tl.constexpr, FULL: tl.constexpr, C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,  # unused: products are always fp32
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``_tile_kernel`` for few rows without tl.dot: each [BLOCK_R, BLOCK_K] weight tile
    is loaded once and multiplied by all BLOCK_N (1..8) hidden rows, fp32 products."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_t * BLOCK_R >= count:
        return  # tile entirely past the active rows: reducers mask it by count
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r = pid_t * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + kk
        h = tl.load(h_ptr + n[:, None] * stride_hn + k[None, :] * stride_hk,
                    mask=(n < N)[:, None] & (k[None, :] < H), other=0.0).to(tl.float32)
        w = tl.load(rows_ptr + r[:, None] * stride_rr + k[None, :] * stride_rk,
                    mask=(r < count)[:, None] & (k[None, :] < H), other=0.0).to(tl.float32)
        acc += tl.sum(h[:, None, :] * w[None, :, :], axis=2)
    _tile_outputs(acc, n, r, pid_t, count, ids_ptr, bias_ptr, m_ptr, s_ptr, key_ptr, logit_ptr,
                  out_ptr, N, CAP, V, VB, T, stride_on, has_bias, DO_TOPK, FULL, C, BLOCK_R)


@triton.jit(do_not_specialize=["T_in", "T_out", "SPAN", "K", "mode"])
def _merge_kernel(
    m_in, s_in, key_in, m_out, s_out, key_out,
    ids_ptr, count_ptr, val_ptr, tok_ptr, lse_ptr,
    T_in, T_out, SPAN, K, mode,
    DO_TOPK: tl.constexpr, FINAL: tl.constexpr, STORE_LSE: tl.constexpr,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, G: tl.constexpr,
):
    n = tl.program_id(0)
    g = tl.program_id(1)
    count = tl.load(count_ptr)
    j = g * G + tl.arange(0, G)
    ok = (j < T_in) & (j * SPAN < count)  # entry j covers rows [j*SPAN, (j+1)*SPAN)
    m = tl.load(m_in + n * T_in + j, mask=ok, other=float("-inf"))
    s = tl.load(s_in + n * T_in + j, mask=ok, other=0.0)
    mx = tl.max(m, axis=0)
    s = tl.sum(tl.where(ok, s * tl.exp(m - mx), 0.0), axis=0)
    lse = mx + tl.log(s)  # -inf when no row is active (count 0)
    if FINAL:
        if STORE_LSE:
            tl.store(lse_ptr + n, lse)
    else:
        tl.store(m_out + n * T_out + g, mx)
        tl.store(s_out + n * T_out + g, s)
    if DO_TOPK:
        c = tl.arange(0, C_IN)
        keys = tl.load(key_in + n * (T_in * C_IN) + j[:, None] * C_IN + c[None, :],
                       mask=ok[:, None], other=_KEY_MIN_C)
        if C_OUT == 1:
            top = tl.max(tl.reshape(keys, [G * C_IN]), axis=0, keep_dims=True)
        else:
            top = tl.topk(tl.reshape(keys, [G * C_IN]), C_OUT)
        co = tl.arange(0, C_OUT)
        if FINAL:
            hi = (top >> 32).to(tl.int32)
            bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
            v = bits.to(tl.float32, bitcast=True)
            row = 2147483647 - (top & 2147483647)
            live = row < count
            tok = tl.load(ids_ptr + row, mask=live, other=-1)
            v = tl.where(mode == 1, tl.exp(v - lse), tl.where(mode == 2, v - lse, v))
            v = tl.where(live, v, tl.where(mode == 1, 0.0, float("-inf")))
            tl.store(val_ptr + n * K + co, v.to(val_ptr.dtype.element_ty), mask=co < K)
            tl.store(tok_ptr + n * K + co, tl.where(live, tok, -1), mask=co < K)
        else:
            tl.store(key_out + n * (T_out * C_OUT) + g * C_OUT + co, top)


@triton.jit(do_not_specialize=["N", "CAP", "V", "mode"])
def _scatter_kernel(
    logit_ptr, lse_ptr, ids_ptr, count_ptr, out_ptr, N, CAP, V, stride_on, mode,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    count = tl.load(count_ptr)
    if tl.program_id(1) * BLOCK_S >= count:
        return
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    live = r < count
    tok = tl.load(ids_ptr + r, mask=live, other=V)
    valid = (n < N)[:, None] & live[None, :] & (tok < V)[None, :]
    x = tl.load(logit_ptr + n[:, None] * CAP + r[None, :], mask=valid, other=0.0)
    lse = tl.load(lse_ptr + n, mask=n < N, other=0.0)
    x = x - lse[:, None]
    x = tl.where(mode == 1, tl.exp(x), x)
    tl.store(out_ptr + n[:, None] * stride_on + tok[None, :], x.to(out_ptr.dtype.element_ty), mask=valid)


@dataclasses.dataclass(frozen=True)
class Tunables:
    """How one call runs (:func:`pick_tunables`); ``block_r`` is raised to C when below."""

    gemv: bool  # _gemv_kernel (no tl.dot), else _tile_kernel
    block_n: int  # hidden rows per program: 1..8 for GEMV, 16..64 for tl.dot (its minimum 16)
    block_r: int  # compact weight rows per program: one tile, one entry of the first merge
    block_k: int  # hidden features per step of the K loop
    merge_keys: int  # keys one _merge_kernel program reduces (G tiles x C candidates)
    num_warps: int = 4


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def pick_tunables(n_rows: int, dtype: torch.dtype, interpreted: bool, gemv=None) -> Tunables:
    """The tunables for ``n_rows`` hidden rows of ``dtype``.

    ``gemv`` forces the tile kernel (None: GEMV up to ``GEMV_MAX_ROWS`` rows). GEMV: a
    [BLOCK_N, BLOCK_R, BLOCK_K] product per K step bounded by ``GEMV_PRODUCTS`` (registers).
    tl.dot: decode calls (N <= 16) are bound by reading the compact rows: on a GPU, 16-row
    tiles give ~2 programs per SM for a few thousand rows (e.g. 188 for 3000 rows).
    Interpreted, 32-row tiles halve the number of (slow) program instances. Untuned:
    ``bench/gpu_head_latency.py --variants`` is the judge.
    """
    if gemv is None:
        gemv = n_rows <= GEMV_MAX_ROWS
    if gemv:
        block_n = min(8, triton.next_power_of_2(max(1, n_rows)))
        block_r = 32 if interpreted else GEMV_BLOCK_R
        block_k = min(128, max(16, _pow2_floor(GEMV_PRODUCTS // (block_n * block_r))))
        return Tunables(True, block_n, block_r, block_k, GEMV_MERGE_KEYS)
    block_n = min(64, max(16, triton.next_power_of_2(n_rows)))
    if block_n <= 16:
        block_r = 32 if interpreted else 16
    else:
        block_r = 32 if block_n == 32 else 64
    block_k = 64 if dtype == torch.float32 or block_n > 16 else 128
    return Tunables(False, block_n, block_r, block_k, _MERGE_KEYS)


def _launch(hidden, rows, ids, count, bias, k, normalize, vocab_size, tunables=None):
    """Shared driver. ``k=0``: no top-k; ``vocab_size=0``: no full output; ``tunables``:
    None for :func:`pick_tunables`'s choice."""
    if normalize not in _MODES:
        raise ValueError(f"normalize must be one of {tuple(_MODES)}, got {normalize!r}")
    mode = _MODES[normalize]
    n_rows, h = hidden.shape
    cap = rows.shape[0] - 1
    vocab = vocab_size if vocab_size else 2**31 - 1  # ids of live rows are < V anyway
    dev, f32, interp = hidden.device, torch.float32, _interpreted()
    do_topk, do_full = k > 0, vocab_size > 0
    # Candidates per tile: a power of two >= k. On a GPU at least 16 (k > 1) so that
    # k = 2..16 share one compiled variant; interpreted, the exact size (cheaper sorts).
    c = 1 if k <= 1 else triton.next_power_of_2(k) if interp else max(16, triton.next_power_of_2(k))
    t = tunables or pick_tunables(n_rows, hidden.dtype, interp)
    block_n, block_r, block_k = t.block_n, max(t.block_r, c), t.block_k
    n_tiles = triton.cdiv(cap, block_r)
    upcast = interp or hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32)
    precision = "ieee" if (upcast or hidden.dtype == torch.float32) else "tf32"
    # The interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest even):
    # when interpreted, kernels write bf16 outputs as fp32 and torch rounds them here.
    out_dtype = f32 if interp and hidden.dtype == torch.bfloat16 else hidden.dtype
    m = _alloc((n_rows, n_tiles), f32, dev)
    s = _alloc((n_rows, n_tiles), f32, dev)
    keys = _alloc((n_rows, n_tiles, c), torch.int64, dev) if do_topk else ids
    full_mode, out, scratch, lse = 0, m, m, None
    if do_full:
        out = _alloc((n_rows, vocab_size), out_dtype, dev)
        block_v = 2048
        _fill_kernel[(n_rows, triton.cdiv(vocab_size, block_v))](
            out, n_rows, vocab_size, out.stride(0), 0.0 if mode == 1 else float("-inf"),
            BLOCK_V=block_v)
        full_mode = 2 if mode == 0 else 1
        if full_mode == 1:
            scratch = _alloc((n_rows, cap), f32, dev)
            lse = _alloc((n_rows,), f32, dev)
    (_gemv_kernel if t.gemv else _tile_kernel)[(triton.cdiv(n_rows, block_n), n_tiles)](
        hidden, rows, ids, count, bias if bias is not None else m,
        m, s, keys, scratch, out,
        n_rows, h, cap, vocab, bias.shape[0] if bias is not None else 1, n_tiles,
        hidden.stride(0), hidden.stride(1), rows.stride(0), rows.stride(1), out.stride(0),
        int(bias is not None), DO_TOPK=do_topk, FULL=full_mode, C=c, UPCAST=upcast,
        PRECISION=precision, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=t.num_warps)

    values = token_ids = None
    if do_topk:
        values = _alloc((n_rows, k), out_dtype, dev)
        token_ids = _alloc((n_rows, k), torch.int64, dev)
    if do_topk or lse is not None:
        # Merge G entries per program until one is left; entry j of a level covers
        # rows [j * span, (j + 1) * span). At least 16 per group on a GPU (one variant).
        span, t_in = block_r, n_tiles
        group_cap = max(2, t.merge_keys // c)
        while True:
            g = min(max(triton.next_power_of_2(t_in), 1 if interp else 16), group_cap)
            t_out = triton.cdiv(t_in, g)
            final = t_out == 1
            m_o = m if final else _alloc((n_rows, t_out), f32, dev)
            s_o = s if final else _alloc((n_rows, t_out), f32, dev)
            k_o = keys if final or not do_topk else _alloc((n_rows, t_out, c), torch.int64, dev)
            _merge_kernel[(n_rows, t_out)](
                m, s, keys, m_o, s_o, k_o,
                ids, count, values if do_topk else m, token_ids if do_topk else ids,
                lse if lse is not None else m,
                t_in, t_out, span, max(k, 1), mode,
                DO_TOPK=do_topk, FINAL=final, STORE_LSE=final and lse is not None,
                C_IN=c, C_OUT=c, G=g, num_warps=4)
            if final:
                break
            m, s, keys, t_in, span = m_o, s_o, k_o, t_out, span * g
    if full_mode == 1:
        block_s = 64
        _scatter_kernel[(triton.cdiv(n_rows, 16), triton.cdiv(cap, block_s))](
            scratch, lse, ids, count, out, n_rows, cap, vocab_size, out.stride(0), mode,
            BLOCK_N=16, BLOCK_S=block_s, num_warps=4)
    if out_dtype != hidden.dtype:
        values = values.to(hidden.dtype) if do_topk else None
        out = out.to(hidden.dtype) if do_full else None
    return values, token_ids, (out if do_full else None)


def sparse_topk_triton(hidden, rows, ids, count, bias, k, normalize="none", *, tunables=None):
    """Top-k over the active rows (``sparse_topk_reference`` semantics).

    Parameters
    ----------
    hidden : [N, H] fp32 / fp16 / bf16 (any strides)
    rows : [CAP + 1, H], same dtype as ``hidden``
    ids : [CAP + 1] int64
    count : [1] int64, read on the device only
    bias : [V] or None, gathered through ``ids``
    k : int, >= 1 (argmax is ``k=1``); k > 64 falls back to ``sparse_topk_reference``
    normalize : ``"none"``, ``"softmax"`` or ``"log_softmax"`` (over the active rows)
    tunables : :class:`Tunables` or None (:func:`pick_tunables`); for benches and tests

    Returns
    -------
    values : [N, k] in ``hidden.dtype``; -inf (0 for softmax) past the active count
    token_ids : [N, k] int64; -1 past the active count
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > _MAX_K:  # beyond the kernel's candidate lists: the capturable reference
        return sparse_topk_reference(hidden, rows, ids, count, bias, k, normalize)
    values, token_ids, _ = _launch(hidden, rows, ids, count, bias, k, normalize, 0, tunables)
    return values, token_ids


def sparse_full_triton(hidden, rows, ids, count, bias, vocab_size, normalize="none", *,
                       tunables=None):
    """Full-vocabulary output (``sparse_full_reference`` semantics).

    Parameters
    ----------
    hidden, rows, ids, count, bias, normalize, tunables
        As in :func:`sparse_topk_triton`.
    vocab_size : int
        V, the width of the output.

    Returns
    -------
    [N, V] in ``hidden.dtype``: -inf (0 for softmax) outside the active set, the
    (normalised) active values scattered to their token ids.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return _launch(hidden, rows, ids, count, bias, 0, normalize, vocab_size, tunables)[2]

