"""``microspec train-eagle``: data, features, training and evaluation of an EAGLE head.

Stages, each cached in ``work_dir`` and skipped when its output exists, so an
interrupted run resumes where it stopped:

1. ``regen-NNN.pt``: ShareGPT prompts answered by the target (batched greedy, in
   chunks of ``chunk`` prompts, within ``generate_minutes``);
2. ``original.pt``: more prompts with ShareGPT's own answers (a disjoint slice);
3. ``code-regen-NNN.pt`` and ``code-original.pt``: documented standard-library
   functions (raw text, HumanEval's shape), continued by the target from their
   docstring within ``code_generate_minutes``, and a disjoint slice with their
   own bodies;
4. ``features-*.pt``: the target's teacher-forced features of all of them (fp16);
5. ``checkpoint.pt``: the training loop (``train_minutes`` of compute), from a
   fresh head or from ``init_head`` (fine-tuning an earlier head on more data);
6. the head, its config and a model card in ``out_dir``, with the held-out
   top-1 agreement measured on the target's greedy continuations.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...analysis.results import machine_info
from ...heads import EagleHead
from .code_corpus import code_sequences, stdlib_functions
from .corpus import Sequence, chat_prompt_ids, original_sequences, regenerate, training_prompts
from .evaluate import agreement_by_group, evaluation_prompts, head_agreement, held_out_continuations
from .features import FeatureSet, atomic_save, compute_features, frequent_ids
from .trainer import TrainConfig, train

__all__ = ["FREQUENT_FILE", "FRSPEC_ROWS", "PipelineConfig", "frequent_ids", "run_pipeline"]

FREQUENT_FILE = "frequent_ids.json"
FRSPEC_ROWS = 32768  # FR-Spec's sub-vocabulary (its paper); a quarter of smaller vocabularies


@dataclass(frozen=True)
class PipelineConfig:
    """What to train on and for how long (defaults: about 90 minutes on 2 CPU cores).

    The target answers ShareGPT prompts ``regen_skip .. regen_skip + regen_prompts`` (as many
    as ``generate_minutes`` allow; a ``regen_skip`` past the prompts an earlier head was
    trained on gives a fine-tuning run new answers); the slice with ShareGPT's own answers
    starts 500 prompts after that range.
    """

    regen_prompts: int = 4000
    regen_skip: int = 0
    original_prompts: int = 3000
    max_new_tokens: int = 192
    max_len: int = 512
    generate_minutes: float = 22.0
    train_minutes: float = 50.0
    chunk: int = 128
    batch_size: int = 32
    code_regen_prompts: int = 1024
    code_original: int = 2500
    code_max_new_tokens: int = 128
    code_generate_minutes: float = 8.0

    def __post_init__(self):
        if self.regen_skip < 0:
            raise ValueError(f"regen_skip must be >= 0 prompts, got {self.regen_skip}")


def _load_sequences(path: Path) -> list[Sequence]:
    return [Sequence(ids, int(p)) for ids, p in torch.load(path, weights_only=True)]


def _save_sequences(path: Path, seqs: list[Sequence]) -> None:
    atomic_save([(s.ids, s.prompt_len) for s in seqs], path)


def _regenerated(target, tokenizer, work: Path, prompts: list[list[int]], prefix: str,
                 minutes: float, max_new_tokens: int, cfg: PipelineConfig, log) -> list[Sequence]:
    """The target's greedy answers to ``prompts``, in resumable chunks ``{prefix}-NNN.pt``."""
    seqs, start = [], time.perf_counter()
    budget = minutes * 60
    done_s = sum(json.loads(p.read_text())["seconds"] for p in work.glob(f"{prefix}-*.json"))
    for k, first in enumerate(range(0, len(prompts), cfg.chunk)):
        path = work / f"{prefix}-{k:03d}.pt"
        if path.is_file():
            seqs += _load_sequences(path)
            continue
        spent = done_s + time.perf_counter() - start
        if spent >= budget:
            break
        t0 = time.perf_counter()
        chunk = regenerate(target, tokenizer, prompts[first:first + cfg.chunk],
                           max_new_tokens=max_new_tokens, batch_size=cfg.batch_size,
                           seconds=budget - spent)
        _save_sequences(path, chunk)
        path.with_suffix(".json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
        seqs += chunk
        answers = sum(len(s.ids) - s.prompt_len for s in seqs)
        log(f"{prefix}: {len(seqs)} answers, {answers} tokens, "
            f"{done_s + time.perf_counter() - start:.0f}/{budget:.0f} s")
    return seqs


def _cached_sequences(path: Path, make) -> list[Sequence]:
    if path.is_file():
        return _load_sequences(path)
    seqs = make()
    _save_sequences(path, seqs)
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
                 train_config: TrainConfig | None = None, init_head: str | Path | None = None,
                 log=print, progress=None, model: str | None = None) -> dict:
    """Run (or resume) every stage; returns the report that the model card records.

    ``init_head``: a saved head to start training from (its own report is kept in
    this one under ``"initialised_from"``); none: a fresh head.  ``model``: how the target
    was named (``--model``), for the model card's command line.
    """
    train_config = train_config or TrainConfig()
    t_start = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    chat = [chat_prompt_ids(tokenizer, u)
            for u, _ in training_prompts(config.regen_prompts, skip=config.regen_skip)]
    regen = _regenerated(target, tokenizer, work, chat, "regen", config.generate_minutes,
                         config.max_new_tokens, config, log)
    orig = _cached_sequences(work / "original.pt", lambda: original_sequences(
        tokenizer, training_prompts(config.original_prompts,
                                    skip=config.regen_skip + config.regen_prompts + 500),
        max_len=config.max_len))
    functions = stdlib_functions(config.code_regen_prompts + config.code_original)  # parse once
    code_prompts = [tokenizer(h, add_special_tokens=False)["input_ids"]
                    for h, _ in functions[: config.code_regen_prompts]]
    code_regen = _regenerated(target, tokenizer, work, code_prompts, "code-regen",
                              config.code_generate_minutes, config.code_max_new_tokens,
                              config, log) if config.code_regen_prompts else []
    code_orig = _cached_sequences(work / "code-original.pt", lambda: code_sequences(
        tokenizer, functions[config.code_regen_prompts:], max_len=config.max_len))
    regen = [Sequence(s.ids[: config.max_len], s.prompt_len) for s in regen]
    parts = {"regenerated": regen, "original": orig, "code-regenerated": code_regen,
             "code-original": code_orig}
    data = FeatureSet.concat([_features(target, name, seqs, work, log)
                              for name, seqs in parts.items() if seqs])
    log(f"training data: {len(data)} sequences, {int(data.starts[-1])} tokens, "
        f"{data.answer_tokens()} answer tokens")

    torch.manual_seed(train_config.seed)
    head = EagleHead.for_target(target)
    initialised_from = None
    if init_head is not None:
        start = EagleHead.load(init_head, target, dtype=torch.float32)
        head.load_state_dict(start.trainable_state(), strict=False)
        initialised_from = {"path": str(init_head), **_saved_report(init_head)}
    summary = train(head, data, work, seconds=config.train_minutes * 60, config=train_config,
                    progress=progress)
    log(f"trained: {summary}")

    prompts = evaluation_prompts()
    held = held_out_continuations(target, tokenizer, prompts)
    quality = head_agreement(target, head, held)
    names = [p["name"] for p in prompts]
    quality["by_group"] = agreement_by_group(names, quality)
    log(f"held-out top-1 agreement: {quality['agreement']:.3f} over {quality['positions']} "
        f"positions ({quality['by_group']})")
    report = {
        "target": getattr(target.config, "_name_or_path", None) or type(target).__name__,
        "model": model,
        "data": {**{f"{name}_answers": len(seqs) for name, seqs in parts.items()},
                 **{f"{name}_answer_tokens": sum(len(s.ids) - s.prompt_len for s in seqs)
                    for name, seqs in parts.items()},
                 "sequence_tokens": int(data.starts[-1])},
        "initialised_from": initialised_from,
        "pipeline": asdict(config), "training": {**asdict(train_config), **summary},
        "held_out": {"prompts": [p["name"] for p in prompts], **quality},
        "wall_seconds_this_run": time.perf_counter() - t_start,
        "hardware": machine_info(detail=True),
    }
    head.save(out_dir, metadata=report)
    write_model_card(Path(out_dir) / "MODEL_CARD.md", report)
    vocab = head.config.vocab_size
    frequent = frequent_ids(data.ids, vocab, min(FRSPEC_ROWS, vocab // 4))
    (Path(out_dir) / FREQUENT_FILE).write_text(json.dumps(
        {"counted_on": f"the {int(data.starts[-1])} training tokens (prompts and answers)",
         "fraction": len(frequent) / vocab, "ids": frequent.tolist()}) + "\n")
    return report


def _saved_report(directory) -> dict:
    """The data, training and held-out quality recorded with a saved head."""
    meta = json.loads((Path(directory) / "eagle_config.json").read_text()).get("metadata", {})
    return {k: meta[k] for k in ("data", "training", "held_out", "initialised_from") if k in meta}


def _data_lines(d: dict, p: dict) -> list[str]:
    lines = [
        f"- {d['regenerated_answers']} ShareGPT first turns"
        + (f" (after the first {p['regen_skip']})" if p.get("regen_skip") else "")
        + f" answered by the target itself (batched greedy, up to {p['max_new_tokens']} tokens): "
        f"{d['regenerated_answer_tokens']} answer tokens;",
        f"- {d['original_answers']} more first turns with ShareGPT's own answers: "
        f"{d['original_answer_tokens']} answer tokens;"]
    if d.get("code-original_answers") or d.get("code-regenerated_answers"):
        lines += [
            f"- {d['code-regenerated_answers']} documented Python standard-library functions "
            f"(raw text, no template) continued by the target from their docstring (up to "
            f"{p['code_max_new_tokens']} tokens): {d['code-regenerated_answer_tokens']} tokens;",
            f"- {d['code-original_answers']} more such functions with their own bodies: "
            f"{d['code-original_answer_tokens']} tokens;"]
    return lines + [
        f"- {d['sequence_tokens']} tokens in all (prompts included), at most "
        f"{p['max_len']} tokens per sequence; teacher-forced target features cached in fp16."]


def _training_line(t: dict) -> str:
    return (f"{t['steps']} steps of <= {t['token_budget']} padded tokens, {t['epochs']:.2f} "
            f"epochs, {t['tokens']} loss positions, {t['seconds'] / 60:.1f} min of training "
            f"compute, lr {t['lr']}; final training top-1 agreement {t['last_agreement']:.3f} "
            f"(mean of the last 50 steps)")


def _reproduce_line(p: dict, t: dict, init: dict | None, model: str | None = None) -> str:
    default = asdict(PipelineConfig())
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in p.items() if default.get(k, v) != v]
    flags = " ".join([*([f"--model {model}"] if model else []), *changed, f"--lr {t['lr']}"] + (
        [f"--rollout-weight {t['rollout_weight']}"] if t.get("rollout_weight") else []) + (
        [f"--ce-weight {t['ce_weight']}"] if t["ce_weight"] != TrainConfig.ce_weight else []) + (
        [f"--ce-vocab {t['ce_vocab']}"] if t.get("ce_vocab") else []))
    if not init:
        return f"Reproduce: `microspec train-eagle --out DIR {flags}` (every stage resumes)."
    return ("Reproduce: train the earlier head first (its report is in `eagle_config.json` under "
            f"`initialised_from`), then `microspec train-eagle --out DIR --init-head EARLIER "
            f"{flags}` (every stage resumes).")


def _earlier_stage_lines(init: dict | None) -> list[str]:
    """One line per earlier head this one was fine-tuned from, newest first."""
    lines = []
    while init:
        lines.append(f"- started from an earlier head ({init['held_out']['agreement']:.3f} "
                     f"held-out agreement), itself trained {_training_line(init['training'])}"
                     + (f", rollout weight {init['training']['rollout_weight']}"
                        if init["training"].get("rollout_weight") else "")
                     + f", on {init['data']['sequence_tokens']} tokens of the data above;")
        init = init.get("initialised_from")
    return lines


def write_model_card(path: Path, report: dict) -> None:
    """A short model card from the pipeline's report (data, tokens, epochs, time, quality)."""
    d, t, h, hw = report["data"], report["training"], report["held_out"], report["hardware"]
    p, init = report["pipeline"], report.get("initialised_from")
    lines = [
        f"# EAGLE-2 draft head for {report.get('target', 'SmolLM2-135M-Instruct')}",
        "",
        "An EAGLE-1/2 head (fc `Linear(2H, H)` + one Llama decoder layer without its input norm) "
        "that reads the target's post-norm last hidden state and the next token and predicts the "
        "next feature; the target's own LM head scores it (shared, not stored here). "
        "fp16 safetensors, made by `microspec train-eagle` on this project's machine.",
        "",
        "## Data (evaluation prompts held out: all MT-bench turns, all HumanEval prompts)",
        *_data_lines(d, p),
        "",
        "## Training",
        f"- loss: SmoothL1(feature) + {t['ce_weight']} x soft cross-entropy against the target's "
        + (f"distribution over {t['ce_vocab']} vocabulary rows per batch (the batch's own tokens, "
           "filled up with the most frequent training tokens)" if t.get("ce_vocab") else
           "distribution over the full vocabulary")
        + f"; uniform feature noise {t['noise']} x 512 / T"
        + (f"; plus {t['rollout_weight']} x the same loss one step deeper on the head's own "
           "predicted features (EAGLE-3's training-time test)" if t.get("rollout_weight") else "")
        + ";",
        f"- AdamW (warm-up {t['warmup_steps']} steps, cosine to 10%), betas "
        f"{tuple(t['betas'])}, grad clip {t['grad_clip']}, "
        f"{'bf16 autocast' if t.get('autocast', True) else 'fp32'}, seed {t['seed']};",
        f"- {_training_line(t)}.",
        *_earlier_stage_lines(init),
        "",
        "## Held-out quality",
        f"- teacher-forced top-1 agreement with the target's argmax on the target's own greedy "
        f"continuations of {len(h['prompts'])} held-out prompts ({h['positions']} positions): "
        f"**{h['agreement']:.3f}**"
        + "".join(f"; {g}: {a:.3f}" for g, a in h.get("by_group", {}).items()) + ".",
        *([f"- one step deeper, on the head's own predicted features (what a depth-1 tree node "
           f"computes): **{h['depth2_agreement']:.3f}**."] if "depth2_agreement" in h else []),
        "",
        "## Hardware",
        f"- {hw.get('cpu_model')}, {hw.get('cpus')} cores, torch {hw.get('torch')}; "
        f"flags: {hw.get('cpu_flags', '-')}.",
        "",
        _reproduce_line(p, t, init, report.get("model")),
    ]
    path.write_text("\n".join(lines) + "\n")
