"""The vocabulary policy on the real EAGLE-2 head: what each signal adds (issue 11, point 6).

Policies of the microspec way (``microspec_compile.policy``), with the shipped head,
the demo's tree and packed verification, on the tuning prompts of ``bench_eagle_tree``
(held out, not the demo's), interleaved prompt by prompt:

* ``paper``        MicroSpec's (``policy.PAPER``): prompt ids + the target's top-3 at
                   every prompt position, then tree tokens, emitted tokens and the
                   target's top-3 per tree node;
* ``no-topk``      the same without the target's top-k (argmax only);
* ``paper+core``   the paper's policy plus a frequency core pinned for the whole
                   request: the ``--core`` most frequent tokens of the training text;
* ``tuned+core``   ``policy.TUNED`` (no prompt signal, the target's top-8 per tree
                   node) with the same core: the decoders' default;
* ``dense``        the dense head prepacked (``dense-packed``): the acceptance to reach.

Every decoder has a vocabulary of its own over the one head.  Reported per policy:
tokens per verification (and its ratio to the dense head's), coverage of the emitted
tokens, mean active vocabulary, prefill ms per request, draft ms per round, tokens/s
end to end and decode only (medians over runs).
Rows go to ``bench/results/eagle_policy.csv``.
Usage: python bench/bench_eagle_policy.py [--runs N] [--core N] [--held-out N] [--model M]
[--head DIR]
"""
from __future__ import annotations

import argparse

import torch

from microspec_compile.apps.data import default_prompts, encode, humaneval_problems, mtbench_questions
from microspec_compile.apps.demo import WARMUP_PROMPTS, default_head_dir, load_frequent_ids
from microspec_compile.apps.measure import fmt, measure_ways, summarize
from microspec_compile.apps.models import load_causal_lm
from microspec_compile.heads import EagleHead
from microspec_compile.policy import PAPER, TUNED, VocabPolicy
from microspec_compile.spec import (
    DecoderConfig,
    TreeConfig,
    pack_head_linears,
    pack_verification,
    prepare,
)

from bench_eagle_tree import tuning_prompts
from common import append_rows, loadavg

WAYS = ("paper", "no-topk", "paper+core", "tuned+core", "dense")


def held_out_prompts(n: int) -> list[dict]:
    """``n`` prompts disjoint from the demo's: MT-bench first turns that are not the demo's
    (two thirds), then HumanEval problems from /10 on (a third)."""
    demo = {p["name"] for p in default_prompts()}
    n_code = n // 3
    chat = [{"name": f"mtbench/{q['question_id']}", "text": q["turns"][0], "chat": True}
            for q in mtbench_questions() if f"mtbench/{q['question_id']}" not in demo]
    code = [{"name": p["task_id"], "text": p["prompt"], "chat": False}
            for p in humaneval_problems()[10:10 + n_code]]
    return chat[: n - len(code)] + code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--ways", default=",".join(WAYS),
                        help=f"comma-separated ways to run, of {', '.join(WAYS)} (dense: always)")
    parser.add_argument("--held-out", type=int, default=0,
                        help="N > 0: N prompts none of the demo's (two thirds MT-bench first "
                             "turns, a third HumanEval from /10), instead of the 6 tuning ones")
    parser.add_argument("--core", type=int, default=512, help="frequency-core size")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2",
                        help="a named model (smollm2, gemma3-270m), HF dir or .gguf")
    parser.add_argument("--head", default=None,
                        help="EAGLE head dir (default: the one shipped for --model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, tokenizer = load_causal_lm(args.model)
    head_dir = args.head or default_head_dir(args.model)
    head = EagleHead.load(head_dir, target)
    eos, tree, capacity = tokenizer.eos_token_id, TreeConfig(), 4096
    core = tuple(int(i) for i in load_frequent_ids(head_dir)[: args.core])
    with_core = tuple(dict.fromkeys((eos, *core)))
    settings = {"paper": (PAPER, (eos,)), "no-topk": (VocabPolicy(0, 0), (eos,)),
                "paper+core": (PAPER, with_core), "tuned+core": (TUNED, with_core),
                "dense": (None, ())}
    packed = pack_verification(target, tree)
    head_linears = pack_head_linears(head, tree)

    def way(policy, pinned: tuple):
        # every decoder has a vocabulary of its own over the same head
        config = (DecoderConfig(head="dense-packed", tree=tree) if policy is None else
                  DecoderConfig(tree=tree, capacity=capacity, pinned_ids=pinned, policy=policy))
        decoder = prepare(target, head, config, verify_linears=packed,
                          draft_linears=head_linears)
        return lambda ids, seed: decoder.generate(ids, args.max_new_tokens, eos_token_id=eos)

    chosen = [w for w in WAYS if w in args.ways.split(",") or w == "dense"]
    ways = {name: way(*settings[name]) for name in chosen}
    prompts = held_out_prompts(args.held_out) if args.held_out else tuning_prompts(3, 3)
    inputs = [encode(tokenizer, p) for p in prompts]
    warm = [encode(tokenizer, {"text": t, "chat": True}) for t in WARMUP_PROMPTS]
    res = measure_ways(ways, [p["name"] for p in prompts], inputs, warm, args.runs, 0, True)
    ref = res["outputs"]["dense"]
    dense = summarize(res["records"]["dense"])["tokens_per_target_step"]
    print(f"{'policy':<11} {'tok/verif':>9} {'vs dense':>8} {'coverage':>8} {'|S| mean':>8} "
          f"{'prefill ms':>10} {'draft ms':>8} {'tok/s':>7} {'decode':>7} {'same output':>11}")
    rows = []
    for name in chosen:
        s = summarize(res["records"][name])
        same = res["outputs"][name] == ref
        print(f"{name:<11} {s['tokens_per_target_step']:9.3f} "
              f"{s['tokens_per_target_step'] / dense:8.3f} {fmt(s['coverage'], '8.3f')} "
              f"{fmt(s['mean_vocab_size'], '8.0f')} {s['prefill_ms']:10.1f} "
              f"{s['draft_step_ms']:8.2f} {s['tokens_per_s']:7.2f} "
              f"{s['decode_tokens_per_s']:7.2f} {'yes' if same else 'no':>11}")
        rows.append({"bench": "eagle_policy", "policy": name, "core": args.core,
                     "tokens_per_verification": s["tokens_per_target_step"],
                     "vs_dense": s["tokens_per_target_step"] / dense,
                     "coverage": s["coverage"], "mean_vocab_size": s["mean_vocab_size"],
                     "prefill_ms": s["prefill_ms"], "draft_ms": s["draft_step_ms"],
                     "tokens_per_s": s["tokens_per_s"],
                     "decode_tokens_per_s": s["decode_tokens_per_s"],
                     "runs": args.runs, "prompts": len(prompts), "threads": args.threads,
                     "head": str(head_dir), "load": loadavg()})
    calls = torch._dynamo.utils.counters["microspec"]
    print(f"microspec head calls (all policies): {calls['sparse_calls']} sparse, "
          f"{calls['dense_fallback_calls']} dense, {calls['scorer_eager_calls']} uncompiled")
    print(f"rows appended to {append_rows('eagle_policy.csv', rows)}")


if __name__ == "__main__":
    main()
