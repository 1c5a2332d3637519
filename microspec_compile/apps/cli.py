"""Command line: ``microspec demo ...`` (also ``python -m microspec_compile.apps.cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from ..policy import POLICIES
from ..spec.eagle import TreeConfig

__all__ = ["build_parser", "main"]

# the demo's pinned core (``demo.DEFAULT_CORE``; not imported: the demo module loads the models'
# stack, and --help should not wait for it)
DEFAULT_CORE = 1024


def build_parser() -> argparse.ArgumentParser:
    """The ``microspec`` argument parser (one sub-command per task)."""
    parser = argparse.ArgumentParser(
        prog="microspec",
        description="microspec-compile: a torch.compile backend that gives a speculative-decoding "
                    "draft a sparse LM head over a live active vocabulary.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="target alone vs EAGLE-2 with a dense / FR-Spec / microspec head",
        description="Decode held-out prompts (MT-bench, HumanEval; or --prompt) with Gemma 3 270M "
                    "(262,144 tokens; --model smollm2: SmolLM2-135M-Instruct): the target alone, "
                    "context lookup alone, and EAGLE-2 tree speculative decoding with the shipped "
                    "EAGLE head whose LM head is dense (Inductor, or prepacked per row count), a "
                    "fixed set of the most frequent tokens (FR-Spec: 32,768, or a quarter of a "
                    "smaller vocabulary), or compiled by the microspec backend. Prints a table, "
                    "writes a JSON file and a PNG chart.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--prompt", action="append", default=None,
                      help="user message (repeat for several); none: MT-bench + HumanEval prompts")
    demo.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt")
    demo.add_argument("--head", default=None,
                      help="EAGLE head directory; none: the one shipped for --model")
    tree = TreeConfig()
    demo.add_argument("--depth", type=int, default=tree.depth, help="EAGLE-2 tree expansions")
    demo.add_argument("--top-k", type=int, default=tree.top_k, help="EAGLE-2 children per node")
    demo.add_argument("--total-tokens", type=int, default=tree.total_tokens,
                      help="EAGLE-2 tree tokens verified per round (root included)")
    demo.add_argument("--lookup", type=int, default=tree.lookup,
                      help="context lookup: when the last 2-3 tokens recur, verify the up to N "
                           "tokens that followed them instead of the head's tree; 0: off")
    demo.add_argument("--runs", type=int, default=3, help="timed runs (medians are reported)")
    demo.add_argument("--sample", action="store_true", help="sampling instead of greedy")
    demo.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the sampling (with --sample) and of the ways' order")
    demo.add_argument("--capacity", type=int, default=4096, help="microspec vocabulary capacity")
    demo.add_argument("--core", type=int, default=DEFAULT_CORE,
                      help="the most frequent tokens of the head's training text pinned in the "
                           "microspec vocabulary beside the context policy; 0: off")
    demo.add_argument("--model", default="gemma3-270m",
                      help="a named model (gemma3-270m, smollm2), a local HF checkpoint dir or "
                           ".gguf (Gemma 3 270M: the Gemma terms of use apply)")
    demo.add_argument("--policy", choices=sorted(POLICIES), default="tuned",
                      help="the microspec vocabulary's policy: tuned (the target's top-8 at "
                           "verified positions, no prompt signal) or paper (MicroSpec's: the "
                           "target's top-3 at prompt and verified positions)")
    demo.add_argument("--no-pack-target", action="store_true",
                      help="verify with plain F.linear instead of MKL-prepacked fp32 "
                           "linears packed for the tree's size")
    demo.add_argument("--target-weights", choices=("auto", "int4", "fp32"), default="auto",
                      help="the target's decoder linears run the checkpoint's exact "
                           "4-bit groups natively (int4, bf16 inputs), or dequantized fp32; "
                           "auto: int4 where this torch has the kernel, the weights qualify and "
                           "int4 is measured faster on this CPU at load")
    demo.add_argument("--threads", type=int, default=0,
                      help="torch threads; 0: torch's default, every core (how the target runs "
                           "by itself; on an idle 2-core AMD EPYC a 4-token verification then "
                           "costs what a one-token step does, which is memory-bound); 1 is more "
                           "robust where another process competes for the cores")
    demo.add_argument("--out", default="demo_results.json", help="JSON path (chart: same name .png)")
    demo.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .train import add_parser as add_train_parser

    add_train_parser(sub)
    return parser


def fail(command: str, message: str) -> NoReturn:
    """One line on stderr naming the problem and its fix, and exit status 2 (a usage error)."""
    print(f"microspec {command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_model_and_head(command: str, model: str | None, head: str | None) -> None:
    """Before anything loads: ``model`` is a named model or an existing checkpoint, and the
    EAGLE head is a directory with its two files, or one ships for ``model``."""
    from .models import MODELS, model_name

    named = model is None or model_name(model) is not None
    if not named and not Path(model).exists():
        fail(command, f"unknown model {model!r}: give a named model ({', '.join(MODELS)}), a "
                      "local Hugging Face checkpoint directory or a .gguf file")
    if head is None:
        if command == "demo" and not named:
            fail(command, f"no EAGLE head ships for {model!r}: pass --head DIR (a head trained "
                          "with microspec train-eagle)")
        return
    from ..heads.checkpoints import OWN_CONFIG, OWN_WEIGHTS, missing_files

    missing = missing_files(head)
    if command == "train-eagle":  # fine-tuning starts from a head of this project's layout
        missing = [n for n in (OWN_CONFIG, OWN_WEIGHTS) if not (Path(head) / n).is_file()]
    elif not (Path(head) / "frequent_ids.json").is_file():  # the demo's FR-Spec way
        missing.append("frequent_ids.json (microspec train-eagle writes it)")
    if missing:
        fail(command, f"no EAGLE head at {head} ({' and '.join(missing)} missing): pass the "
                      "directory microspec train-eagle wrote (its --out)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``microspec`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (KeyError, IndexError):  # lookups gone wrong are bugs: their traceback is wanted
        raise
    except (ValueError, FileNotFoundError, LookupError) as error:  # the user's to fix
        fail(args.command, str(error))


def run(args) -> int:
    """Run the parsed command."""
    if args.command == "demo":
        for name in ("max_new_tokens", "runs", "capacity", "depth", "top_k", "total_tokens"):
            if getattr(args, name) < 1:
                fail("demo", f"--{name.replace('_', '-')} must be >= 1")
        if args.lookup < 0:
            fail("demo", "--lookup must be >= 0 (0: off)")
        check_model_and_head("demo", args.model, args.head)
        import torch

        from .measure import demo_threads

        torch.set_num_threads(demo_threads(args.threads))
        from .demo import run_eagle_demo

        tree = TreeConfig(depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens,
                          lookup=args.lookup)
        run_eagle_demo(args.prompt, max_new_tokens=args.max_new_tokens, tree=tree,
                       runs=args.runs, sample=args.sample, temperature=args.temperature,
                       seed=args.seed, capacity=args.capacity, policy=args.policy,
                       core=args.core,
                       pack_target=not args.no_pack_target,
                       target_weights=args.target_weights,
                       model=args.model, head_dir=args.head, out=args.out,
                       chart=not args.no_chart, progress=not args.no_progress)
    elif args.command == "train-eagle":
        check_model_and_head("train-eagle", args.model, args.init_head)
        from .train import main as train_main

        return train_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
