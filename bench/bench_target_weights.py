"""One target forward of T tokens after a cached prompt: fp32 weights vs the GGUF's 4-bit ones.

What a speculative round pays for verification (T = the tree's size) and the
target alone pays per token (T = 1), for SmolLM2-135M-Instruct in four set-ups:

- ``fp32 dynamic``: the decoder linears as loaded (dequantized fp32) and Hugging Face's
  ``DynamicCache`` (appends by ``torch.cat``): the previous sessions' target;
- ``fp32``: the same weights in the loops' cache (``spec.cache.DecodingCache``, rows
  written in place);
- ``int4 dynamic``: the linears' exact 4-bit groups (``linears.int4``) with fp64
  rows appended by ``torch.cat`` (``DynamicCache``) and fp64 decoding attention;
- ``int4``: the same in the loops' exact session (``spec.verify.target_session``: fp64
  rows written in place by ``DecodingCache``, fp64 decoding attention).

The LM head stays fp32 in all four; every linear left fp32 is packed for T >= 2
(``linears.PackedLinears``, as the demo verifies).  The four are timed interleaved in
one process, in shuffled order every round; rows go to
``bench/results/target_weights.csv``.

    python bench/bench_target_weights.py [--rows 1 4 8] [--rounds 15] [--context 300]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
from transformers import DynamicCache

from microspec_compile.apps.measure import interleaved_rounds
from microspec_compile.apps.models import load_causal_lm
from microspec_compile.linears.int4 import quantize_exact_int4
from microspec_compile.linears.packed import PackedLinears
from microspec_compile.spec.attention import exact_attention, gqa_attention
from microspec_compile.spec.tree import causal_mask
from microspec_compile.spec.verify import target_forward, target_session

from common import append_rows, machine_info


class Float64DynamicCache(DynamicCache):
    """Hugging Face's appending cache with fp64 rows (what exact attention reads)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states.double(), value_states.double(), layer_idx,
                              *args, **kwargs)


def forward_after_context(model, cache, attend, packs: dict, context: int, rows: int, generator):
    """A callable: one forward of ``rows`` random tokens after ``context`` cached ones in
    ``cache``, inside ``attend()`` (the attention context)."""
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    with torch.inference_mode(), attend():
        target_forward(model, prompt, cache, torch.arange(context).view(1, -1),
                       causal_mask(0, context))

    @torch.inference_mode()
    def step():
        ids = torch.randint(0, model.config.vocab_size, (1, rows), generator=generator)
        with attend(), packs.get(rows, contextlib.nullcontext()):
            target_forward(model, ids, cache, torch.arange(context, context + rows).view(1, -1),
                           causal_mask(context, rows))
        cache.crop(context - cache.get_seq_length())  # a view: no copy in either cache
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--context", type=int, default=300)
    args = parser.parse_args()
    fp32, _ = load_causal_lm(None)
    int4, _ = load_causal_lm(None)
    replaced = quantize_exact_int4(int4)
    generator = torch.Generator().manual_seed(0)
    setups = {  # name: model, a new cache, its attention context
        "fp32 dynamic": (fp32, lambda: DynamicCache(config=fp32.config),
                         lambda: gqa_attention(fp32.config)),
        "fp32": (fp32, lambda: target_session(fp32)[0], lambda: gqa_attention(fp32.config)),
        "int4 dynamic": (int4, lambda: Float64DynamicCache(config=int4.config),
                         lambda: exact_attention(int4.config)),
        "int4": (int4, lambda: target_session(int4)[0], lambda: exact_attention(int4.config))}
    fns = {}
    for name, (model, new_cache, attend) in setups.items():
        packs = {r: PackedLinears(model, r) for r in args.rows if r >= 2}
        for rows in args.rows:
            fns[f"{name} T={rows}"] = forward_after_context(model, new_cache(), attend, packs,
                                                            args.context, rows, generator)
    for fn in fns.values():  # warm-up
        fn()
    samples = interleaved_rounds(fns, min_rounds=args.rounds)
    info = machine_info()
    print(f"{info.get('machine')} | {torch.get_num_threads()} threads | torch {torch.__version__}"
          f" | int4 linears: {replaced} | context {args.context}")
    rows = []
    for rows_n in args.rows:
        ms = {name: statistics.median(samples[f"{name} T={rows_n}"]) for name in setups}
        base = ms["fp32 dynamic"]
        print(f"T={rows_n:<3} " + "   ".join(f"{name} {t:6.2f} ms ({t / base:.2f}x)"
                                            for name, t in ms.items()))
        rows.append({"rows": rows_n, "context": args.context,
                     **{f"{name.replace(' ', '_')}_ms": round(t, 3) for name, t in ms.items()},
                     "int4_vs_fp32_dynamic": round(ms["int4"] / base, 4),
                     "int4_linears": replaced, "rounds": args.rounds})
    append_rows("target_weights.csv", rows)


if __name__ == "__main__":
    main()
