"""``microspec train-eagle``: data, features, training and evaluation of an EAGLE head.

Stages, each cached in ``work_dir`` and skipped when its output exists, so an
interrupted run resumes where it stopped:

1. ``regen-NNN.pt``: ShareGPT prompts answered by the target (batched greedy, in
   chunks of ``chunk`` prompts, within ``generate_minutes``);
2. ``original.pt``: more prompts with ShareGPT's own answers (a disjoint slice);
3. ``features-*.pt``: the target's teacher-forced features of both (fp16);
4. ``checkpoint.pt``: the training loop (``train_minutes`` of compute);
5. the head, its config and a model card in ``out_dir``, with the held-out
   top-1 agreement measured on the target's greedy continuations.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..analysis.results import machine_info
from ..heads import EagleHead
from .corpus import Sequence, chat_prompt_ids, original_sequences, regenerate, training_prompts
from .evaluate import evaluation_prompts, head_agreement, held_out_continuations
from .features import FeatureSet, atomic_save, compute_features
from .trainer import TrainConfig, train

__all__ = ["FREQUENT_FILE", "PipelineConfig", "frequent_ids", "run_pipeline"]

FREQUENT_FILE = "frequent_ids.json"


@dataclass(frozen=True)
class PipelineConfig:
    """What to train on and for how long (defaults: about 90 minutes on 2 CPU cores)."""

    regen_prompts: int = 4000
    original_prompts: int = 3000
    max_new_tokens: int = 192
    max_len: int = 512
    generate_minutes: float = 22.0
    train_minutes: float = 50.0
    chunk: int = 128
    batch_size: int = 32


def _load_sequences(path: Path) -> list[Sequence]:
    return [Sequence(ids, int(p)) for ids, p in torch.load(path, weights_only=True)]


def _save_sequences(path: Path, seqs: list[Sequence]) -> None:
    atomic_save([(s.ids, s.prompt_len) for s in seqs], path)


def _regenerated(target, tokenizer, work: Path, cfg: PipelineConfig, log) -> list[Sequence]:
    prompts = [chat_prompt_ids(tokenizer, u) for u, _ in training_prompts(cfg.regen_prompts)]
    seqs, start = [], time.perf_counter()
    budget = cfg.generate_minutes * 60
    done_s = sum(json.loads(p.read_text())["seconds"] for p in work.glob("regen-*.json"))
    for k, first in enumerate(range(0, len(prompts), cfg.chunk)):
        path = work / f"regen-{k:03d}.pt"
        if path.is_file():
            seqs += _load_sequences(path)
            continue
        spent = done_s + time.perf_counter() - start
        if spent >= budget:
            break
        t0 = time.perf_counter()
        chunk = regenerate(target, tokenizer, prompts[first:first + cfg.chunk],
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                           seconds=budget - spent)
        _save_sequences(path, chunk)
        path.with_suffix(".json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
        seqs += chunk
        answers = sum(len(s.ids) - s.prompt_len for s in seqs)
        log(f"regenerate: {len(seqs)} answers, {answers} tokens, "
            f"{done_s + time.perf_counter() - start:.0f}/{budget:.0f} s")
    return seqs


def _features(target, name: str, seqs: list[Sequence], work: Path, log) -> FeatureSet:
    path = work / f"features-{name}.pt"
    if path.is_file():
        return FeatureSet.load(path)
    t0 = time.perf_counter()
    fs = compute_features(target, seqs)
    fs.save(path)
    log(f"features {name}: {len(fs)} sequences, {int(fs.starts[-1])} tokens, "
        f"{time.perf_counter() - t0:.0f} s")
    return fs


def run_pipeline(target, tokenizer, work_dir: str | Path, out_dir: str | Path, *,
                 config: PipelineConfig = PipelineConfig(),
                 train_config: TrainConfig | None = None,
                 log=print, progress=None) -> dict:
    """Run (or resume) every stage; returns the report that the model card records."""
    train_config = train_config or TrainConfig()
    t_start = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    regen = _regenerated(target, tokenizer, work, config, log)
    orig_path = work / "original.pt"
    if orig_path.is_file():
        orig = _load_sequences(orig_path)
    else:
        pairs = training_prompts(config.original_prompts, skip=config.regen_prompts + 500)
        orig = original_sequences(tokenizer, pairs, max_len=config.max_len)
        _save_sequences(orig_path, orig)
    regen = [Sequence(s.ids[: config.max_len], s.prompt_len) for s in regen]
    data = FeatureSet.concat([_features(target, "regenerated", regen, work, log),
                              _features(target, "original", orig, work, log)])
    log(f"training data: {len(data)} sequences, {int(data.starts[-1])} tokens, "
        f"{data.answer_tokens()} answer tokens")

    torch.manual_seed(train_config.seed)
    head = EagleHead.for_target(target)
    summary = train(head, data, work, seconds=config.train_minutes * 60, config=train_config,
                    progress=progress)
    log(f"trained: {summary}")

    prompts = evaluation_prompts()
    held = held_out_continuations(target, tokenizer, prompts)
    quality = head_agreement(target, head, held)
    log(f"held-out top-1 agreement: {quality['agreement']:.3f} over {quality['positions']} positions")
    report = {
        "data": {"regenerated_answers": len(regen),
                 "regenerated_answer_tokens": sum(len(s.ids) - s.prompt_len for s in regen),
                 "original_answers": len(orig),
                 "original_answer_tokens": sum(len(s.ids) - s.prompt_len for s in orig),
                 "sequence_tokens": int(data.starts[-1])},
        "pipeline": asdict(config), "training": {**asdict(train_config), **summary},
        "held_out": {"prompts": [p["name"] for p in prompts], **quality},
        "wall_seconds_this_run": time.perf_counter() - t_start,
        "hardware": machine_info(detail=True),
    }
    head.save(out_dir, metadata=report)
    write_model_card(Path(out_dir) / "MODEL_CARD.md", report)
    frequent = frequent_ids(data.ids, head.config.vocab_size, 0.25)
    (Path(out_dir) / FREQUENT_FILE).write_text(json.dumps(
        {"counted_on": f"the {int(data.starts[-1])} training tokens (prompts and answers)",
         "fraction": 0.25, "ids": frequent.tolist()}) + "\n")
    return report


def write_model_card(path: Path, report: dict) -> None:
    """A short model card from the pipeline's report (data, tokens, epochs, time, quality)."""
    d, t, h, hw = report["data"], report["training"], report["held_out"], report["hardware"]
    p = report["pipeline"]
    lines = [
        "# EAGLE-2 draft head for SmolLM2-135M-Instruct",
        "",
        "An EAGLE-1/2 head (fc `Linear(2H, H)` + one Llama decoder layer without its input norm) "
        "that reads the target's post-norm last hidden state and the next token and predicts the "
        "next feature; the target's own LM head scores it (shared, not stored here). "
        "fp16 safetensors, made by `microspec train-eagle` on this project's machine.",
        "",
        "## Data (evaluation prompts held out: all MT-bench turns, all HumanEval prompts)",
        f"- {d['regenerated_answers']} ShareGPT first turns answered by the target itself "
        f"(batched greedy, up to {p['max_new_tokens']} tokens, {p['generate_minutes']} min budget): "
        f"{d['regenerated_answer_tokens']} answer tokens;",
        f"- {d['original_answers']} more first turns with ShareGPT's own answers: "
        f"{d['original_answer_tokens']} answer tokens;",
        f"- {d['sequence_tokens']} tokens in all (prompts included), chat template, at most "
        f"{p['max_len']} tokens per sequence; teacher-forced target features cached in fp16.",
        "",
        "## Training",
        f"- loss: SmoothL1(feature) + {t['ce_weight']} x soft cross-entropy against the target's "
        f"distribution over the full vocabulary; uniform feature noise {t['noise']} x 512 / T;",
        f"- AdamW lr {t['lr']} (warm-up {t['warmup_steps']} steps, cosine to 10%), betas "
        f"{tuple(t['betas'])}, grad clip {t['grad_clip']}, bf16 autocast, seed {t['seed']};",
        f"- {t['steps']} steps of <= {t['token_budget']} padded tokens, {t['epochs']:.2f} epochs, "
        f"{t['tokens']} loss positions, {t['seconds'] / 60:.1f} min of training compute;",
        f"- final training loss {t['last_loss']:.3f}, training top-1 agreement "
        f"{t['last_agreement']:.3f} (mean of the last 50 steps).",
        "",
        "## Held-out quality",
        f"- teacher-forced top-1 agreement with the target's argmax on the target's own greedy "
        f"continuations of {len(h['prompts'])} held-out prompts ({h['positions']} positions): "
        f"**{h['agreement']:.3f}**.",
        "",
        "## Hardware",
        f"- {hw.get('cpu_model')}, {hw.get('cpus')} cores, torch {hw.get('torch')}; "
        f"flags: {hw.get('cpu_flags', '-')}.",
        "",
        "Reproduce: `microspec train-eagle --out DIR` (every stage resumes from its work directory).",
    ]
    path.write_text("\n".join(lines) + "\n")


def frequent_ids(tokens: torch.Tensor, vocab_size: int, fraction: float) -> torch.Tensor:
    """The most frequent ``fraction`` of the vocabulary in ``tokens``, most frequent first
    (FR-Spec's fixed sub-vocabulary; ties broken by id)."""
    counts = torch.bincount(tokens.long(), minlength=vocab_size).double()
    order = torch.argsort(-counts + torch.arange(vocab_size) / (2.0 * vocab_size))
    return order[: max(1, int(vocab_size * fraction))]
