"""A full EAGLE-2 round (draft tree + tree verification) on a GPU: dense vs microspec head.

The target is a ``transformers`` ``LlamaForCausalLM`` with the Llama-3-8B shape
(H=4096, 32 heads / 8 KV heads, I=14336, V=128256) but only ``--layers`` decoder
layers (4 by default, so that it fits the check's time), random weights, bf16; the
draft is ``microspec_compile.heads.EagleHead.for_target(target)`` (random weights).
The LM-head calls go through ``microspec_compile.spec.TopkScorer(target's head, k)``
compiled twice: with Inductor (``dense``) and with
``backend=microspec_compile.backend(capacity=...)`` (``microspec``, vocabulary from
``microspec_compile.vocab_of(scorer, capacity=...)``). Both run
``microspec_compile.spec.eagle_generate`` greedily on one random prompt, after an
untimed warm-up run that compiles; the outputs must be equal (greedy verification is
lossless whatever the draft proposes).

Random weights accept almost nothing, so a round emits ~1 token: the table reports
time per round (draft, verification, total) rather than a speed-up in tokens.

``--quick``: 2 layers and 10 new tokens; ``--fail-fast``: stop at the first failed head
(exit 1) instead of going on.

Usage::

    python bench/gpu_eagle_round.py [--quick] [--out FILE]     # CUDA, bf16
    python bench/gpu_eagle_round.py --cpu-smoke [--eager]      # tiny model on CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import microspec_compile as mc
from microspec_compile.heads import EagleHead
from microspec_compile.spec import TopkScorer, TreeConfig, eagle_generate

from common import emit_table

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                 max_position_embeddings=8192)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512)


def build_models(args):
    """``(target, head)`` on ``args.device`` in ``args.dtype``, random weights (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TINY if args.cpu_smoke else LLAMA3_8B
    config = LlamaConfig(num_hidden_layers=args.layers, tie_word_embeddings=False, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        target = LlamaForCausalLM(config).to(args.dtype).eval()
        head = EagleHead.for_target(target).eval()
    return target, head


def run(args) -> list[str]:
    for name in ("recompile_limit", "cache_size_limit"):  # two scorers on one forward
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    target, head = build_models(args)
    vocab_size = target.config.vocab_size
    tree = TreeConfig(depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens)
    dense = TopkScorer(target.get_output_embeddings(), args.top_k)
    sparse = TopkScorer(target.get_output_embeddings(), args.top_k)
    vocab = mc.vocab_of(sparse, capacity=args.capacity)
    if args.eager:
        scorers = {"dense": torch.compile(dense, backend="eager"),
                   "microspec": torch.compile(sparse, backend=mc.backend(
                       capacity=args.capacity, inductor=False))}
    else:
        scorers = {"dense": torch.compile(dense, backend="inductor"),
                   "microspec": torch.compile(sparse, backend=mc.backend(capacity=args.capacity))}
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab_size, (1, args.prompt), generator=gen).to(args.device)
    lines = [f"# EAGLE-2 round: Llama-3-8B shape x {args.layers} layers"
             if not args.cpu_smoke else "# EAGLE-2 round: tiny Llama",
             f"# V={vocab_size} H={target.config.hidden_size} {str(args.dtype)[6:]} prompt "
             f"{args.prompt}, {args.new_tokens} new tokens, tree depth {tree.depth} top_k "
             f"{tree.top_k} total {tree.total_tokens}, capacity {args.capacity}",
             f"{'head':<11}{'rounds':>7}{'draft ms':>10}{'verify ms':>11}{'round ms':>10}"
             f"{'vocab':>7}{'warm-up s':>11}"]
    outputs = {}
    for name, scorer in scorers.items():
        kwargs = {"vocab": vocab} if name == "microspec" else {}
        try:
            t0 = time.perf_counter()
            eagle_generate(target, head, scorer, prompt, 4, tree, **kwargs)  # compiles
            warm = time.perf_counter() - t0
            sync()
            t0 = time.perf_counter()
            ids, stats = eagle_generate(target, head, scorer, prompt, args.new_tokens, tree,
                                        **kwargs)
            sync()
            total = time.perf_counter() - t0
        except Exception as e:  # one broken head must not hide the other
            lines.append(f"{name:<11}  failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:150] if str(e) else ''}")
            if args.fail_fast:
                emit_table(lines, args.out)
                raise
            continue
        outputs[name] = ids
        rounds = len(stats.draft_times)
        draft = statistics.median(stats.draft_times) * 1e3
        verify = statistics.median(stats.target_times) * 1e3
        size = statistics.median(stats.vocab_sizes) if stats.vocab_sizes else vocab_size
        lines.append(f"{name:<11}{rounds:>7}{draft:>10.2f}{verify:>11.2f}"
                     f"{total / max(rounds, 1) * 1e3:>10.2f}{size:>7.0f}{warm:>11.1f}")
    if len(outputs) == 2:
        same = torch.equal(outputs["dense"], outputs["microspec"])
        lines.append(f"greedy outputs equal: {'OK' if same else 'FAILED (they differ)'}")
    return lines


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (4; --quick: 2)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--total-tokens", type=int, default=60)
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="fewer tokens")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, fp32, on CPU")
    p.add_argument("--eager", action="store_true", help="no Inductor (fast smoke test)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed head")
    p.add_argument("--out", type=Path, help="also append the lines to this file")
    args = p.parse_args(argv)
    args.dtype = torch.bfloat16
    if args.layers is None:
        args.layers = 2 if args.quick else 4
    if args.quick:
        args.new_tokens = 10
    if args.cpu_smoke:
        args.device, args.dtype, args.layers, args.prompt = "cpu", torch.float32, 2, 16
        args.new_tokens, args.depth, args.top_k, args.total_tokens = 4, 2, 4, 8
        args.capacity = 256
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke")
    lines = run(args)
    if not emit_table(lines, args.out):
        sys.exit(1)


if __name__ == "__main__":
    main()
