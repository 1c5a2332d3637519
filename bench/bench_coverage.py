"""Coverage and active-vocabulary size of vocabulary policies on real text.

For every request (a dialogue of alternating user / assistant turns) the active set
S starts as the policy's pinned core; user turns enter S without being scored (the
prompt), assistant turns are the "generation": at each generated position the next
token is a hit if it is already in S, then (context policies) it is added to S.

Policies
--------
- ``context``: S = prompt tokens U everything generated so far (no frequency list);
- ``context+coreN``: the same U the N most frequent tokens of a ShareGPT slice;
- ``frspec32k``: a fixed set of the 32768 most frequent tokens, no context (FR-Spec).

The frequency slice (ShareGPT conversations [0, FREQUENCY_LIMIT)) is disjoint from
the evaluated ShareGPT slice (conversations after it). Each turn is tokenized on its
own (chat templates separate turns with special tokens), with 128k+ vocabularies:
quicktok ``llama3`` (128256) and ``qwen3`` (151669).

The paper's own policy (target top-3 at each position on a model's generations)
needs a model and lives elsewhere.

Usage: ``python bench/bench_coverage.py [--smoke | --quick | --full]`` (default
--quick). Rows are appended to ``bench/results/coverage.csv``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from microspec_compile.analysis.coverage import Stats, simulate
from microspec_compile.apps import data
from microspec_compile.apps.frequency import FREQUENCY_LIMIT, frequent_token_ids, get_encoding

from common import append_rows, mode_parser

CSV_NAME = "coverage.csv"
TARGET_COVERAGE, TARGET_MEAN_SIZE = 0.97, 3000
CORE_SIZES = (500, 1000, 2000)
FRSPEC_SIZE = 32768

# Requests per dataset (None: all) and the frequency slice size, per mode.
MODES = {
    "smoke": {"tokenizers": ("llama3", "qwen3"), "mtbench": 3, "humaneval": 4, "sharegpt": 3,
              "freq_limit": 200},
    "quick": {"tokenizers": ("llama3", "qwen3"), "mtbench": None, "humaneval": None, "sharegpt": 300,
              "freq_limit": FREQUENCY_LIMIT},
    "full": {"tokenizers": ("llama3", "qwen3"), "mtbench": None, "humaneval": None, "sharegpt": None,
             "freq_limit": FREQUENCY_LIMIT},
}


@dataclass(frozen=True)
class Policy:
    name: str
    core_size: int     # pinned most-frequent tokens (0: none)
    use_context: bool  # prompt and generated tokens join S


POLICIES = (
    Policy("context", 0, True),
    *(Policy(f"context+core{n}", n, True) for n in CORE_SIZES),
    Policy("frspec32k", FRSPEC_SIZE, False),
)


def load_dialogues(cfg: dict) -> dict[str, list[list[str]]]:
    """Requests per dataset as alternating user / assistant turn texts."""
    humaneval = [[p["prompt"], p["canonical_solution"]] for p in data.humaneval_problems()]
    return {
        "mtbench": data.mtbench_reference_dialogues()[: cfg["mtbench"]],
        "humaneval": humaneval[: cfg["humaneval"]],
        "sharegpt": data.sharegpt_conversations(limit=cfg["sharegpt"], skip=FREQUENCY_LIMIT),
    }


def tokenize(enc, dialogues: list[list[str]]) -> list[list[np.ndarray]]:
    """Token ids of every turn, grouped per dialogue (one batched encode call)."""
    texts = [turn for dialogue in dialogues for turn in dialogue]
    tokens, offsets = enc.encode_batch(texts, 0, False)
    segments = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(texts))]
    out, start = [], 0
    for dialogue in dialogues:
        out.append(segments[start:start + len(dialogue)])
        start += len(dialogue)
    return out


def core_mask(encoding_name: str, n: int, n_vocab: int, freq_limit: int) -> np.ndarray:
    mask = np.zeros(n_vocab, dtype=bool)
    if n:
        mask[frequent_token_ids(encoding_name, n, limit=freq_limit)] = True
    return mask


def run(mode: str) -> list[dict]:
    """Evaluate every policy on every tokenizer and dataset; return the CSV rows."""
    cfg = MODES[mode]
    dialogues = load_dialogues(cfg)
    n_requests = sum(len(d) for d in dialogues.values())
    rows = []
    with tqdm(total=len(cfg["tokenizers"]) * n_requests, desc="coverage", unit="req") as bar:
        for name in cfg["tokenizers"]:
            enc = get_encoding(name)
            bar.set_postfix_str(f"{name}: frequency core")
            masks = [core_mask(name, p.core_size, enc.n_vocab, cfg["freq_limit"]) for p in POLICIES]
            for dataset, requests in dialogues.items():
                bar.set_postfix_str(f"{name}/{dataset}")
                stats = [Stats() for _ in POLICIES]
                for segments in tokenize(enc, requests):
                    for policy, mask, acc in zip(POLICIES, masks, stats):
                        acc.add(simulate(segments, mask, policy.use_context))
                    bar.update()
                eval_slice = (f"sharegpt[{FREQUENCY_LIMIT}:{FREQUENCY_LIMIT + len(requests)}]"
                              if dataset == "sharegpt" else "all")
                for policy, acc in zip(POLICIES, stats):
                    rows.append({
                        "mode": mode, "tokenizer": name, "vocab_size": enc.n_vocab,
                        "dataset": dataset, "eval_slice": eval_slice, "n_requests": len(requests),
                        "policy": policy.name, "core_size": policy.core_size,
                        "freq_slice": f"sharegpt[0:{cfg['freq_limit']}]" if policy.core_size else "",
                        "coverage": round(acc.coverage, 4), "mean_size": round(acc.mean_size, 1),
                        "max_size": acc.size_max, "n_positions": acc.positions,
                        "meets_target": acc.coverage >= TARGET_COVERAGE
                        and acc.mean_size <= TARGET_MEAN_SIZE,
                    })
    return rows


def report_target(rows: list[dict]) -> None:
    """Print, per tokenizer, the policies meeting the target on every dataset."""
    print(f"target: coverage >= {TARGET_COVERAGE} with mean active vocabulary <= {TARGET_MEAN_SIZE}")
    for name in dict.fromkeys(r["tokenizer"] for r in rows):
        mine = [r for r in rows if r["tokenizer"] == name]
        winners = [p.name for p in POLICIES
                   if all(r["meets_target"] for r in mine if r["policy"] == p.name)]
        if winners:
            print(f"  {name}: met on every dataset by {', '.join(winners)}")
            continue
        print(f"  {name}: no policy meets it on every dataset; per dataset:")
        for dataset in dict.fromkeys(r["dataset"] for r in mine):
            ok = [r["policy"] for r in mine if r["dataset"] == dataset and r["meets_target"]]
            print(f"    {dataset:<10} {', '.join(ok) or 'none'}")


def print_table(rows: list[dict]) -> None:
    header = f"{'tokenizer':<9} {'dataset':<10} {'policy':<16} {'coverage':>8} {'mean_size':>9} " \
             f"{'max_size':>8} {'positions':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['tokenizer']:<9} {r['dataset']:<10} {r['policy']:<16} {r['coverage']:>8.4f} "
              f"{r['mean_size']:>9.1f} {r['max_size']:>8} {r['n_positions']:>9}")


def main(argv: list[str] | None = None) -> None:
    parser = mode_parser(__doc__, {
        "smoke": "a few requests and a tiny frequency slice (seconds; for tests)",
        "quick": "300 ShareGPT conversations + all MT-bench/HumanEval (default)",
        "full": "every evaluation conversation"})
    args = parser.parse_args(argv)
    mode = args.mode or "quick"
    start = time.perf_counter()
    rows = run(mode)
    path = append_rows(CSV_NAME, rows)
    elapsed = time.perf_counter() - start
    print(f"\n{len(rows)} rows appended to {path} ({mode}, {elapsed:.1f} s)")
    report_target(rows)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
