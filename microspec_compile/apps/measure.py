"""Interleaved, warmed-up timing: of callables (the benchmarks') and of decoding ways (the demos').

:func:`interleaved_rounds` times several callables once per round each, in an order
shuffled every round, so that machine noise and cache state hit them alike; it is the
one interleaving loop of the project (``bench/common.py`` re-exports it).

:func:`measure_ways` runs it for decoding *ways*, callables
``generate(ids [1, P], seed) -> (ids [P + new], SpecStats)``: every way is warmed up
first on two prompt lengths (compilation is reported apart, as ``warmup_s``), then
``runs`` rounds of all prompts are timed, one interleaved round of the ways per prompt.
Reported numbers are medians over runs of per-run aggregates (all prompts of a run
pooled); ``tokens_per_s`` is new tokens over wall time, prefill included;
``decode_tokens_per_s`` leaves the prefill (``prefill_ms`` per request) out, and
``draft_s`` / ``verify_s`` / ``rest_s`` split the decoding time of a run.
"""
from __future__ import annotations

import functools
import os
import random
import statistics
import time
from typing import Callable, Optional

import torch

__all__ = ["interleaved_rounds", "median", "measure_ways", "summarize", "run_fields", "write_report", "fmt",
           "busy_cores", "demo_threads"]


def busy_cores(seconds: float = 0.5) -> float | None:
    """Cores other processes keep busy right now (from ``/proc/stat`` over ``seconds``, while
    this process sleeps); None where ``/proc/stat`` is missing (not Linux)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1  # /proc/stat's first line sums over every core
    elapsed = total1 - total0
    return cores * (1.0 - (idle1 - idle0) / elapsed) if elapsed > 0 else 0.0


def demo_threads(requested: int, log=print) -> int:
    """The torch threads a demo runs on: ``requested``, or for 0 every core unless another
    process keeps a core busy (multi-threaded fp32 GEMMs then stall at OpenMP barriers,
    measured up to 50x slower on 2 cores), then 1 (said in one line)."""
    if requested:
        return requested
    busy = busy_cores()
    if busy is not None and busy > 0.5:
        log(f"another process keeps {busy:.1f} cores busy: running on 1 thread (--threads N to "
            "choose)")
        return 1
    return torch.get_num_threads()


def interleaved_rounds(fns: dict[str, Callable[[], object]], *, min_rounds: int,
                       max_rounds: Optional[int] = None, budget_s: float = 0.0,
                       rng: Optional[random.Random] = None, flush: Optional[Callable] = None,
                       setup: Optional[dict] = None, on_round: Optional[Callable] = None
                       ) -> dict[str, list[float]]:
    """Time every callable once per round, in a shuffled order each round (milliseconds).

    Parameters
    ----------
    fns : name -> callable with no arguments (the timed call)
    min_rounds, max_rounds, budget_s : at least ``min_rounds``; more while under
        ``budget_s`` seconds, at most ``max_rounds`` (default ``min_rounds``)
    rng : the shuffling generator (default ``random.Random(0)``)
    flush : called untimed before each timed call (e.g. the benchmarks' cache flusher)
    setup : name -> callable run untimed before that name's timed call
    on_round : called with the number of rounds done after each round (progress)

    Returns
    -------
    dict
        name -> list of per-call milliseconds, in round order.
    """
    rng = rng or random.Random(0)
    max_rounds = min_rounds if max_rounds is None else max_rounds
    setup = setup or {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            if name in setup:
                setup[name]()
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if on_round is not None:
            on_round(rounds)
    return samples


def median(values):
    """Median of the non-None ``values`` (None when there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _looked_up(record: dict) -> list:
    """Per round, whether it verified a looked-up chain (False throughout without lookup)."""
    return record.get("looked_up") or [False] * len(record["draft_ms"])


def summarize(records: list) -> dict:
    """Medians over runs of per-run aggregates (all prompts of a run pooled)."""
    per_run: dict = {}
    for r in records:
        per_run.setdefault(r["run"], []).append(r)
    rows = []
    for recs in per_run.values():
        tokens = sum(r["new_tokens"] for r in recs)
        seconds = sum(r["seconds"] for r in recs)
        prefill = sum(r.get("prefill_s", 0.0) for r in recs)
        draft = sum(t for r in recs for t in r["draft_ms"]) / 1e3
        verify = sum(t for r in recs for t in r["target_ms"]) / 1e3
        accepted = [a for r in recs for a in r["accepted"]]
        checked = sum(r["checked"] for r in recs)
        sizes = [s for r in recs for s in r["vocab_sizes"]]
        rows.append({
            "tokens_per_s": tokens / seconds,
            # the same without the prompt's forward (and the policy's prompt signal)
            "decode_tokens_per_s": tokens / (seconds - prefill) if seconds > prefill else None,
            "prefill_ms": 1e3 * prefill / len(recs),  # per request
            # decode time split, seconds over the run's requests: drafting (or lookup),
            # verification (or the target's one-token steps), and the rest (vocabulary
            # upkeep, cache upkeep, the loop itself)
            "decode_s": seconds - prefill,
            "draft_s": draft,
            "verify_s": verify,
            "rest_s": seconds - prefill - draft - verify,
            "mean_accepted": statistics.mean(accepted) if accepted else None,
            "tokens_per_target_step": statistics.mean(accepted) + 1 if accepted else 1.0,
            "coverage": sum(r["covered"] for r in recs) / checked if checked else None,
            "mean_vocab_size": statistics.mean(sizes) if sizes else None,
            # the draft's own rounds (a context lookup takes microseconds, see lookup_share)
            "draft_step_ms": median([t for r in recs
                                     for t, up in zip(r["draft_ms"], _looked_up(r)) if not up]),
            "lookup_share": (statistics.mean(u for r in recs for u in _looked_up(r))
                             if any(r.get("looked_up") for r in recs) else None),
            "target_step_ms": median([t for r in recs for t in r["target_ms"]]),
        })
    out = {k: median([row[k] for row in rows]) for k in rows[0]}
    out["tokens_per_s_runs"] = [row["tokens_per_s"] for row in rows]
    return out


def _record(st, run: int, prompt: str) -> dict:
    """One generation's measurements (``SpecStats``) as a report record, times in ms."""
    return {"run": run, "prompt": prompt, "new_tokens": st.new_tokens,
            "seconds": st.total_time, "prefill_s": st.prefill_time,
            "accepted": st.accepted, "covered": st.covered, "checked": st.checked,
            "vocab_sizes": st.vocab_sizes, "tree_sizes": st.tree_sizes,
            "draft_ms": [1e3 * t for t in st.draft_times], "looked_up": st.looked_up,
            "target_ms": [1e3 * t for t in st.target_times]}


def measure_ways(ways: dict, names: list, inputs: list, warm: list, runs: int, seed: int,
                 progress: bool) -> dict:
    """Warm every way up, then time ``runs`` rounds of all prompts, the ways interleaved in
    a shuffled order for every prompt (:func:`interleaved_rounds`).

    Parameters
    ----------
    ways : {way name: generate(ids, seed)}
    names, inputs : prompt names and their ``[1, P]`` ids
    warm : prompts for the warm-up (two lengths: shape-driven recompiles happen there)

    Returns
    -------
    dict: ``warmup_s`` per way, ``records`` per way (one per prompt and run),
    ``outputs`` per way (first run's new tokens per prompt), ``recompiles`` (graphs
    compiled during the timed runs)
    """
    from tqdm.auto import tqdm

    counters = torch._dynamo.utils.counters
    res = {"warmup_s": {}, "records": {w: [] for w in ways}, "outputs": {w: {} for w in ways}}
    with torch.inference_mode():
        for way, generate in tqdm(ways.items(), desc="warm-up (compile)", disable=not progress):
            t = time.perf_counter()
            for ids in warm:
                generate(ids, seed)
            res["warmup_s"][way] = time.perf_counter() - t
        graphs_before = counters["stats"]["unique_graphs"]
        bar = tqdm(total=runs * len(names) * len(ways), desc="generating", disable=not progress)
        rng = random.Random(seed)  # the ways' order, shuffled for every prompt

        def generate_and_record(way: str, run: int, name: str, ids: torch.Tensor) -> None:
            tokens, st = ways[way](ids, seed + run)  # its own SpecStats time it
            res["records"][way].append(_record(st, run, name))
            if run == 0:
                res["outputs"][way][name] = tokens[ids.shape[1]:].tolist()

        for run in range(runs):
            for name, ids in zip(names, inputs):
                interleaved_rounds(
                    {way: functools.partial(generate_and_record, way, run, name, ids)
                     for way in ways},
                    min_rounds=1, rng=rng, on_round=lambda _: bar.update(len(ways)))
        bar.close()
    res["recompiles"] = counters["stats"]["unique_graphs"] - graphs_before
    return res


def fmt(value, spec: str) -> str:
    """``format(value, spec)``, or ``-`` for a missing value (tables)."""
    return "-" if value is None else format(value, spec)


def run_fields(res: dict, vocab, setup_s: float) -> dict:
    """The report fields every demo records about a :func:`measure_ways` run."""
    return {
        "setup_s": setup_s,  # load the model and head, time and pack the kernels
        "warmup_s": res["warmup_s"],
        "recompiles_during_timing": res["recompiles"],
        "microspec_counters": dict(torch._dynamo.utils.counters["microspec"]),
        "vocab_stats_last_request": vocab.stats() if vocab is not None else None,
        "outputs": res["outputs"],
        "records": res["records"],
    }


def write_report(report: dict, out, plot, table, chart: bool, verbose: bool) -> dict:
    """Write ``report`` as JSON at ``out`` (None: nowhere), its ``plot`` beside it as PNG, and
    print ``table(report)``."""
    import json
    from pathlib import Path

    if out is not None:
        out = Path(out)
        if chart:
            report["chart"] = str(plot(report, out.with_suffix(".png")))
        out.write_text(json.dumps(report, indent=1))
    if verbose:
        print(table(report))
    return report
