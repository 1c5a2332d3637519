"""The paper's vocabulary policy on a real model's own greedy generations.

SmolLM2-135M-Instruct (the embedded default model) generates greedily from real
prompts (MT-bench questions with the chat template, HumanEval prompts). One more
forward over prompt + generation gives the target's top-3 at every position. For
a generated token at position p the active set of the MicroSpec policy is

    S_p = tokens[0 .. p-2]  U  top3(target at positions 0 .. p-2)

i.e. the request as verified two steps earlier: lag 2. At lag 1 the target's own
argmax at p-1 would be in S (greedy: the token itself), which says nothing. Tokens a
draft proposes deep in a tree see lags >= 2, so lag 2 is the honest measure.

Policies compared: ``context`` (tokens only), ``context+top1``, ``context+top3``
(the paper's), and ``context+top3+coreN``: the same plus the N most frequent
SmolLM2 tokens of ShareGPT conversations [0, 2000) (pinned), all at lag 2.
Generations are cached under ~/.cache/microspec_compile so policies can be
re-scored without regenerating. Rows go to ``bench/results/coverage.csv`` with
``tokenizer=smollm2``.

Usage: ``python bench/bench_coverage_model.py [--smoke | --quick | --full]``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

from microspec_compile.analysis.coverage import lagged_coverage

from common import append_rows

LAG = 2
POLICIES = {"context": (0, 0), "context+top1": (1, 0), "context+top3": (3, 0),
            "context+top3+core1000": (3, 1000), "context+top3+core2000": (3, 2000)}
CORE_CONVERSATIONS = 2000
SIZES = {"smoke": (1, 1, 8), "quick": (4, 4, 96), "full": (20, 20, 192)}  # mt, he, new tokens


def prompts(n_mt: int, n_he: int, tokenizer) -> list[tuple[str, list[int]]]:
    from microspec_compile.apps.data import humaneval_problems, mtbench_questions

    out = []
    for q in mtbench_questions()[:n_mt]:
        chat = [{"role": "user", "content": q["turns"][0]}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out.append(("mtbench", list(ids)))
    for p in humaneval_problems()[:n_he]:
        out.append(("humaneval", tokenizer(p["prompt"])["input_ids"]))
    return out


def smollm2_core(tokenizer, n: int) -> tuple:
    """The ``n`` most frequent token ids of ShareGPT conversations [0, 2000)."""
    from microspec_compile.apps.data import sharegpt_conversations

    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for conversation in sharegpt_conversations(limit=CORE_CONVERSATIONS):
        for turn in conversation:
            np.add.at(counts, tokenizer(turn)["input_ids"], 1)
    return tuple(np.argsort(-counts, kind="stable")[:n].tolist())


def generations(size: str, model, tokenizer) -> list:
    """``(dataset, tokens, top3 [T, 3], prompt_len)`` per prompt, cached on disk."""
    import pickle

    from microspec_compile.apps.frequency import cache_dir

    path = cache_dir() / f"smollm2_generations_{size}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    n_mt, n_he, new_tokens = SIZES[size]
    out = []
    for dataset, ids in tqdm(prompts(n_mt, n_he, tokenizer), desc="generate", unit="prompt"):
        x = torch.tensor([ids])
        gen = model.generate(x, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        top3 = model(gen).logits[0].topk(3, dim=-1).indices.numpy()
        out.append((dataset, gen[0].tolist(), top3, len(ids)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(out))
    return out


@torch.inference_mode()
def run(size: str) -> list[dict]:
    from microspec_compile.apps.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm()
    model.eval()
    cores = {n: smollm2_core(tokenizer, n) for n in {n for _, n in POLICIES.values() if n}}
    stats: dict = {}
    for dataset, tokens, top3, prompt_len in generations(size, model, tokenizer):
        for policy, (k, n_core) in POLICIES.items():
            hits, sizes = lagged_coverage(tokens, top3[:, :k], prompt_len, lag=LAG,
                                          core=cores.get(n_core, ()))
            entry = stats.setdefault((dataset, policy), {"hits": [], "sizes": []})
            entry["hits"] += hits
            entry["sizes"] += sizes
    rows = []
    for (dataset, policy), s in sorted(stats.items()):
        rows.append({"tokenizer": "smollm2", "dataset": dataset, "policy": f"{policy}@lag{LAG}",
                     "coverage": round(float(np.mean(s["hits"])), 4),
                     "mean_size": round(float(np.mean(s["sizes"])), 1),
                     "max_size": int(np.max(s["sizes"])), "n_positions": len(s["hits"])})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    for name in SIZES:
        group.add_argument(f"--{name}", dest="size", action="store_const", const=name)
    args = parser.parse_args(argv)
    size = args.size or "quick"
    start = time.perf_counter()
    rows = run(size)
    append_rows("coverage.csv", rows)
    print(f"\n{size} run, {time.perf_counter() - start:.0f} s; SmolLM2-135M greedy generations")
    print(f"{'dataset':10} {'policy':20} {'coverage':>8} {'mean':>7} {'max':>6} {'n':>6}")
    for r in rows:
        print(f"{r['dataset']:10} {r['policy']:20} {r['coverage']:8.4f} {r['mean_size']:7.1f} "
              f"{r['max_size']:6d} {r['n_positions']:6d}")


if __name__ == "__main__":
    main()
