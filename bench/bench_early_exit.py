"""How well does an untrained early exit of SmolLM2-135M predict the target? (by depth)

The demo's draft is the target's first N of 30 layers plus its final norm and
LM head, with no training.  This script measures, on the target's own greedy
continuations of the demo prompts (MT-bench first turns, HumanEval stubs), the
teacher-forced top-1 agreement ``a`` of that draft with the target for several
N (``microspec_compile.analysis.acceptance.early_exit_agreement``).  Greedy speculative
decoding accepts a drafted token exactly when it agrees, so ``a + a^2 + a^3 +
a^4`` estimates the mean accepted tokens per step at gamma = 4, and the share
of the target's layers gives the draft's cost beside it.

Usage: ``python bench/bench_early_exit.py [--quick] [--threads 2]``.
Rows go to ``bench/results/early_exit.csv``.
"""
from __future__ import annotations

import argparse
import time

import torch

from microspec_compile.analysis.acceptance import early_exit_agreement
from microspec_compile.data import default_prompts, encode
from microspec_compile.models import load_causal_lm

from common import append_rows, loadavg

DEPTHS = (2, 4, 8, 12, 16, 20, 24, 28)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="32 new tokens per prompt (default 64)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = 32 if args.quick else 64
    model, tokenizer = load_causal_lm()
    sequences = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt in default_prompts():
            ids = encode(tokenizer, prompt)
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            sequences.append((ids.shape[1], out))
    layers = model.config.num_hidden_layers
    agreement = early_exit_agreement(model, sequences, [d for d in DEPTHS if d < layers] + [layers])
    scored = sum(out.shape[1] - p for p, out in sequences)
    rows = []
    print(f"{'layers':>6} {'agreement':>9} {'E[accepted], gamma=4':>20} {'layer share':>11}")
    for depth, a in agreement.items():
        expected = sum(a ** i for i in range(1, 5))
        print(f"{depth:6d} {a:9.3f} {expected:20.2f} {depth / layers:11.2f}")
        rows.append({"model": "SmolLM2-135M-Instruct", "draft_layers": depth,
                     "target_layers": layers, "agreement": f"{a:.4f}",
                     "expected_accepted_gamma4": f"{expected:.3f}",
                     "scored_tokens": scored, "prompts": len(sequences),
                     "threads": torch.get_num_threads(), "load": loadavg(),
                     "seconds": f"{time.perf_counter() - t0:.1f}"})
    print(f"{scored} continuation tokens of {len(sequences)} prompts; "
          f"rows -> {append_rows('early_exit.csv', rows)}")


if __name__ == "__main__":
    main()
