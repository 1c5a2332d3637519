"""Training an EAGLE-2 draft head for a target, on this machine (``microspec train-eagle``)."""
from .pipeline import PipelineConfig, run_pipeline
from .trainer import TrainConfig, train

__all__ = ["PipelineConfig", "TrainConfig", "run_pipeline", "train", "add_parser", "main"]


def add_parser(sub) -> None:
    """Add the ``train-eagle`` sub-command to the ``microspec`` argument parser."""
    import argparse

    p = sub.add_parser(
        "train-eagle", help="train an EAGLE-2 draft head for a target on this machine",
        description="Regenerate ShareGPT answers with the target, cache its features, train an "
                    "EAGLE-1/2 head (smooth-L1 + 0.1 soft cross-entropy), measure its held-out "
                    "top-1 agreement and save it (fp16 safetensors + JSON). Every stage resumes "
                    "from the work directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d, t = PipelineConfig(), TrainConfig()
    p.add_argument("--model", default="gemma3-270m",
                   help="target: a named model (gemma3-270m, smollm2), a local HF dir or .gguf")
    p.add_argument("--out", required=True, help="directory for the trained head")
    p.add_argument("--work-dir", default=None,
                   help="cache of data, features and checkpoints; none: a folder under "
                        "~/.cache/microspec_compile")
    p.add_argument("--regen-prompts", type=int, default=d.regen_prompts,
                   help="ShareGPT prompts the target answers itself (its own answers to learn)")
    p.add_argument("--regen-skip", type=int, default=d.regen_skip,
                   help="ShareGPT prompts to skip before those the target answers (fine-tuning: "
                        "past the prompts an earlier head was trained on)")
    p.add_argument("--original-prompts", type=int, default=d.original_prompts,
                   help="ShareGPT conversations trained on with their original answers")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="the longest answer the target writes per prompt")
    p.add_argument("--generate-minutes", type=float, default=d.generate_minutes,
                   help="time budget of the target's answers (the stage stops there)")
    p.add_argument("--train-minutes", type=float, default=d.train_minutes,
                   help="time budget of the training")
    p.add_argument("--chunk", type=int, default=d.chunk, help="prompts per regeneration chunk")
    p.add_argument("--code-regen-prompts", type=int, default=d.code_regen_prompts,
                   help="standard-library functions the target continues from their docstring")
    p.add_argument("--code-original", type=int, default=d.code_original,
                   help="standard-library functions trained on with their own bodies")
    p.add_argument("--code-generate-minutes", type=float, default=d.code_generate_minutes,
                   help="time budget of the target's code continuations")
    p.add_argument("--init-head", default=None,
                   help="a saved head to start from (fine-tune it on this data); none: fresh")
    p.add_argument("--lr", type=float, default=t.lr, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=t.seed,
                   help="seed of the data order and the head's initialisation")
    p.add_argument("--rollout-weight", type=float, default=t.rollout_weight,
                   help="weight of the loss one step deeper on the head's own predictions "
                        "(EAGLE-3's training-time test; what the tree's depth 1 computes); 0: off")
    p.add_argument("--ce-weight", type=float, default=t.ce_weight,
                   help="weight of the soft cross-entropy against the target's distribution "
                        "beside the feature loss (EAGLE: 0.1)")
    p.add_argument("--ce-vocab", type=int, default=t.ce_vocab,
                   help="vocabulary rows of the cross-entropy: the batch's tokens filled up with "
                        "the most frequent training tokens (a cheaper objective for large "
                        "vocabularies); 0: the full vocabulary")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")


def main(args) -> int:
    """Run the ``train-eagle`` sub-command."""
    import dataclasses
    import time
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from ..models import default_cache_dir, load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    target, tokenizer = load_causal_lm(args.model)
    name = Path(str(args.model or "smollm2")).stem
    work = Path(args.work_dir) if args.work_dir else default_cache_dir() / f"train-eagle-{name}"
    cfg = dataclasses.replace(PipelineConfig(), regen_prompts=args.regen_prompts,
                              regen_skip=args.regen_skip,
                              original_prompts=args.original_prompts,
                              max_new_tokens=args.max_new_tokens,
                              generate_minutes=args.generate_minutes,
                              train_minutes=args.train_minutes, chunk=args.chunk,
                              code_regen_prompts=args.code_regen_prompts,
                              code_original=args.code_original,
                              code_generate_minutes=args.code_generate_minutes)
    tcfg = dataclasses.replace(TrainConfig(), lr=args.lr, seed=args.seed,
                               rollout_weight=args.rollout_weight, ce_weight=args.ce_weight,
                               ce_vocab=args.ce_vocab)
    bar = tqdm(desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)

    def progress(step, total, loss, agree):
        if total and bar.total != total:
            bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{agree:.3f}", refresh=False)
        bar.refresh() if step % 10 == 0 else None

    report = run_pipeline(target, tokenizer, work, args.out, config=cfg, train_config=tcfg,
                          init_head=args.init_head, log=tqdm.write, progress=progress,
                          model=args.model)
    bar.close()
    minutes = (time.perf_counter() - t0) / 60
    print(f"budget: generate {cfg.generate_minutes} + {cfg.code_generate_minutes} min (chat, "
          f"code) + train {cfg.train_minutes} min; "
          f"this run took {minutes:.1f} min; held-out top-1 agreement "
          f"{report['held_out']['agreement']:.3f}; head saved to {args.out}")
    return 0
