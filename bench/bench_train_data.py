"""A/B of the training text: the target's own answers vs ShareGPT's answers (issue 11, point 1).

Two fresh EAGLE heads are trained with the same settings, seed and number of steps
on equal numbers of answer tokens:

* ``regenerated``: ShareGPT prompts answered by the target itself (batched greedy);
* ``original``:    other ShareGPT prompts with their own (ChatGPT) answers, the first
                   sequences of that set up to the same answer-token count.

Both are scored by the held-out teacher-forced top-1 agreement of
``microspec train-eagle`` (the target's greedy continuations of MT-bench and
HumanEval prompts).  The features come from a ``train-eagle`` work directory
(``features-regenerated.pt``, ``features-original.pt``).  Rows go to
``bench/results/train_data.csv``.
Usage: python bench/bench_train_data.py --work-dir DIR [--steps N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from microspec_compile.apps.models import load_causal_lm
from microspec_compile.apps.train.evaluate import (
    agreement_by_group,
    evaluation_prompts,
    head_agreement,
    held_out_continuations,
)
from microspec_compile.apps.train.features import FeatureSet
from microspec_compile.apps.train.trainer import TrainConfig, train
from microspec_compile.heads import EagleHead

from common import append_rows, loadavg


def first_with_answer_tokens(data: FeatureSet, tokens: int) -> FeatureSet:
    """The first sequences of ``data`` holding at least ``tokens`` answer tokens."""
    answer = (data.lengths() - data.prompt_lens).cumsum(0)
    last = int(torch.searchsorted(answer, torch.tensor(tokens))) + 1
    return data.select(list(range(min(last, len(data)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="a train-eagle work directory")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    target, tokenizer = load_causal_lm()
    regen = FeatureSet.load(work / "features-regenerated.pt")
    orig = first_with_answer_tokens(FeatureSet.load(work / "features-original.pt"),
                                    regen.answer_tokens())
    prompts = evaluation_prompts()
    held = held_out_continuations(target, tokenizer, prompts)
    names = [p["name"] for p in prompts]
    config = TrainConfig(warmup_steps=min(100, args.steps // 4))
    rows = []
    for name, data in (("regenerated", regen), ("original", orig)):
        torch.manual_seed(config.seed)
        head = EagleHead.for_target(target)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            summary = train(head, data, tmp, seconds=float("inf"), config=config,
                            steps=args.steps)
        quality = head_agreement(target, head, held)
        groups = agreement_by_group(names, quality)
        print(f"{name:<12} {len(data)} sequences, {data.answer_tokens()} answer tokens, "
              f"{summary['steps']} steps ({summary['epochs']:.2f} epochs, "
              f"{time.perf_counter() - t0:.0f} s): held-out agreement "
              f"{quality['agreement']:.3f} {groups}")
        rows.append({"bench": "train_data", "data": name, "sequences": len(data),
                     "answer_tokens": data.answer_tokens(), "steps": summary["steps"],
                     "epochs": summary["epochs"], "held_out_agreement": quality["agreement"],
                     **{f"agreement_{g}": a for g, a in groups.items()},
                     "threads": args.threads, "load": loadavg()})
    print(f"rows appended to {append_rows('train_data.csv', rows)}")


if __name__ == "__main__":
    main()
