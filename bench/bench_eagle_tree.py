"""Tune the EAGLE-2 tree on this CPU: tokens/s of the microspec way per (depth, top_k, total).

EAGLE auto-tunes ``total_tokens`` by timing the target on trees of several sizes;
here the whole loop is timed instead (target, draft and acceptance together), which
also catches the draft's cost and the acceptance a shape buys.  Two parts:

1. the target's forward over T tree tokens after a 300-token cache, relative to a
   one-token step (what verification costs per size), with plain ``F.linear`` and
   with the target's linears prepacked for T rows (``PackedLinears``, the demo's);
2. every tree shape of the grid decodes the *tuning* prompts (held-out MT-bench and
   HumanEval prompts that are not the demo's) with the shipped head, the
   microspec-compiled LM head and the demo's settings; shapes interleaved, median
   tokens/s over ``--runs`` runs.  The best shape is printed: it is the demo default.

The target alone decodes the same prompts in every run too, so each shape's speed-up
over it is a ratio measured side by side.  Rows go to ``bench/results/eagle_tree.csv``.
Usage: python bench/bench_eagle_tree.py [--quick] [--grid 3x8x8,1x4x4x7] [--threads N] [--head DIR]
(a fourth value is the context lookup, TreeConfig.lookup; the default grid has none)
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from microspec_compile.apps.data import encode, humaneval_problems, mtbench_questions
from microspec_compile.apps.demo import default_head_dir
from microspec_compile.apps.models import load_causal_lm
from microspec_compile.heads import EagleHead
from microspec_compile.linears import TARGET_WEIGHTS, TargetConfig, prepare_target
from microspec_compile.linears.packed import PackedLinears
from microspec_compile.spec import DecoderConfig, TreeConfig, autoregressive_generate, prepare
from microspec_compile.spec.tree import causal_mask
from microspec_compile.spec.verify import crop_cache, target_forward, target_session

from common import append_rows, loadavg

DEMO_CATEGORIES = ("writing", "extraction", "coding")  # the demo uses their first questions


def tuning_prompts(n_chat: int, n_code: int) -> list[dict]:
    """Held-out prompts disjoint from the demo's (the demo takes the first of 3 categories
    and HumanEval/0-1)."""
    seen, chat = set(), []
    for q in mtbench_questions():
        if q["category"] in DEMO_CATEGORIES and q["category"] not in seen:
            seen.add(q["category"])  # that one is the demo's
            continue
        if len(chat) < n_chat and q["category"] not in {c["cat"] for c in chat}:
            chat.append({"name": f"mtbench/{q['question_id']}", "text": q["turns"][0],
                         "chat": True, "cat": q["category"]})
    code = [{"name": p["task_id"], "text": p["prompt"], "chat": False}
            for p in humaneval_problems()[10:10 + n_code]]
    return chat + code


@torch.inference_mode()
def verify_cost(target, sizes, past: int = 300, repeats: int = 5, packed: bool = False) -> dict:
    """Median seconds of one target forward over T tokens after ``past`` cached ones
    (``packed``: the target's linears prepacked for T rows)."""
    import contextlib

    cache, attention = target_session(target)  # as the loops attend
    out = {}
    with attention:
        ids = torch.randint(0, target.config.vocab_size, (1, past))
        target_forward(target, ids, cache, torch.arange(past).view(1, -1), causal_mask(0, past))
        for t in [1, *sizes]:
            times = []
            linears = PackedLinears(target, t) if packed and t > 1 else contextlib.nullcontext()
            for _ in range(repeats):
                x = torch.randint(0, target.config.vocab_size, (1, t))
                start = time.perf_counter()
                with linears:
                    target_forward(target, x, cache, torch.arange(past, past + t).view(1, -1),
                                   causal_mask(past, t))
                times.append(time.perf_counter() - start)
                crop_cache(cache, past)
            out[t] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid and fewer prompts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2",
                        help="a named model (smollm2, gemma3-270m), HF dir or .gguf")
    parser.add_argument("--head", default=None,
                        help="EAGLE head dir (default: the one shipped for --model)")
    parser.add_argument("--grid", default=None,
                        help="shapes depth x top_k x total[ x lookup], comma-separated (instead of "
                             "the grid; lookup: TreeConfig.lookup, 0 when left out)")
    parser.add_argument("--skip-verify-cost", action="store_true")
    parser.add_argument("--target-weights", choices=TARGET_WEIGHTS, default="auto",
                        help="the target's decoder linears, as the demo's --target-weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, tokenizer = load_causal_lm(args.model)
    head = EagleHead.load(args.head or default_head_dir(args.model), target)
    weights = prepare_target(target, TargetConfig(args.target_weights))
    print(f"target weights: {weights}")
    eos = tokenizer.eos_token_id

    sizes = [4, 8, 12, 16, 24, 32]
    rows = []
    for packed in (() if args.skip_verify_cost else (False, True)):
        cost = verify_cost(target, sizes, packed=packed)
        print(f"verification cost, {'packed' if packed else 'F.linear'} (T tokens after 300 "
              "cached, relative to one token): " + ", ".join(
                  f"{t}: {cost[t] / cost[1]:.2f}x" for t in sizes)
              + f"  (1 token: {1e3 * cost[1]:.1f} ms)")
        rows += [{"bench": "verify_cost", "tokens": t, "ms": 1e3 * cost[t], "packed": packed,
                  "target_weights": weights,
                  "relative": cost[t] / cost[1], "threads": args.threads, "load": loadavg()}
                 for t in sizes]

    grid = (list(itertools.product([3, 5], [4, 8], [8, 16], [0])) if args.quick else
            list(itertools.product([3, 4, 6], [4, 8], [8, 12, 16, 24], [0])))
    if args.grid:
        grid = [(*(int(v) for v in shape.split("x")), 0)[:4] for shape in args.grid.split(",")]
    prompts = tuning_prompts(2, 2) if args.quick else tuning_prompts(3, 3)
    inputs = [encode(tokenizer, p) for p in prompts]
    # one compiled scorer per top_k, all the same forward: room for each one's graphs
    top_ks = sorted({shape[1] for shape in grid})
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               8 * len(top_ks))
    packs = [PackedLinears(target, t)  # one packing of the target per verified size, shared
             for t in sorted({t for shape in grid for t in TreeConfig(*shape).verified_sizes()})]
    per_k = {k: prepare(target, head, DecoderConfig(tree=TreeConfig(*next(
                 s for s in grid if s[1] == k)), pinned_ids=(eos,)), verify_linears=packs)
             for k in top_ks}
    decoders = {shape: per_k[shape[1]].with_tree(TreeConfig(*shape)) for shape in grid}

    results = {shape: [] for shape in grid}
    alone, ratios = [], {shape: [] for shape in grid}
    accepted = {shape: [] for shape in grid}
    for shape in grid:  # warm-up: compile each row count once
        decoders[shape].generate(inputs[0], 8, eos_token_id=eos)
    for run in range(args.runs):
        # prompt by prompt, the target alone first: a drift of the machine's speed hits all alike
        tokens = {way: 0.0 for way in ["target", *grid]}
        seconds = dict(tokens)
        for ids in inputs:
            _, st = autoregressive_generate(target, ids, args.max_new_tokens, eos_token_id=eos)
            tokens["target"] += st.new_tokens
            seconds["target"] += st.total_time
            for shape in grid:
                _, st = decoders[shape].generate(ids, args.max_new_tokens, eos_token_id=eos)
                tokens[shape] += st.new_tokens
                seconds[shape] += st.total_time
                accepted[shape].append(st.tokens_per_verification())
        alone.append(tokens["target"] / seconds["target"])
        for shape in grid:
            results[shape].append(tokens[shape] / seconds[shape])
            ratios[shape].append(results[shape][-1] / alone[-1])  # within one run
        print(f"run {run + 1}/{args.runs} done")
    base = statistics.median(alone)
    print(f"target alone: {base:.2f} tok/s (median of {args.runs} runs)")
    print(f"{'depth':>5} {'top_k':>5} {'total':>5} {'lookup':>6} {'tok/s':>7} {'vs target':>9} "
          f"{'tok/verif':>9}"
          "  (vs target: median over runs of the ratio within each run)")
    best = max(grid, key=lambda s: statistics.median(results[s]))
    for shape in grid:
        tps, ratio = statistics.median(results[shape]), statistics.median(ratios[shape])
        tpv = statistics.mean(accepted[shape])
        print(f"{shape[0]:>5} {shape[1]:>5} {shape[2]:>5} {shape[3]:>6} {tps:7.2f} {ratio:8.2f}x "
              f"{tpv:9.2f}" + ("  <- best" if shape == best else ""))
        rows.append({"bench": "tree_shape", "depth": shape[0], "top_k": shape[1],
                     "total_tokens": shape[2], "lookup": shape[3], "tokens_per_s": tps, "tokens_per_verification": tpv,
                     "target_tokens_per_s": base, "speedup_vs_target": ratio,
                     "target_weights": weights,
                     "runs": args.runs, "prompts": len(prompts), "threads": args.threads,
                     "load": loadavg()})
    print(f"best tree on this machine: depth={best[0]} top_k={best[1]} total_tokens={best[2]} "
          f"lookup={best[3]}")
    print(f"rows appended to {append_rows('eagle_tree.csv', rows)}")


if __name__ == "__main__":
    main()
