"""The benchmark scripts run end to end (--smoke) and write sane CSV rows; plot.py plots them.

Both smoke runs start together in subprocesses (each pays Inductor's start-up and
compiles real graphs) with ``MICROSPEC_RESULTS_DIR`` pointing to a temporary folder,
so bench/results stays untouched. The whole file takes ~1-3 minutes on 2 cores.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TIMEOUT_S = 480  # both smoke runs together take ~2 minutes on an idle 2-core machine


def _read(path: Path) -> list[dict]:
    assert path.exists(), f"{path.name} was not written"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _f(row: dict, col: str) -> float:
    value = float(row[col])
    assert math.isfinite(value), f"{col}={row[col]!r} in {row}"
    return value


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """Run bench_head.py and bench_draft_step.py --smoke concurrently; return the folder."""
    results = tmp_path_factory.mktemp("results")
    env = {**os.environ, "MICROSPEC_RESULTS_DIR": str(results), "PYTHONUNBUFFERED": "1"}
    procs = {}
    for script in ("bench_head.py", "bench_draft_step.py"):
        log = open(results / f"{script}.log", "w")
        procs[script] = (subprocess.Popen([sys.executable, str(BENCH / script), "--smoke"],
                                          cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + TIMEOUT_S
    failures = []
    for script, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = (results / f"{script}.log").read_text(errors="replace")[-3000:]
            failures.append(f"{script} exited with {proc.returncode}:\n{tail}")
    if failures:
        pytest.fail("\n\n".join(failures))
    return results


def test_head_smoke_rows(smoke_results):
    rows = _read(smoke_results / "head.csv")
    by_provider = {r["provider"]: r for r in rows}
    expected = {"eager_dense", "inductor_dense", "inductor_frspec32k",
                "microspec@1000", "microspec@3000", "microspec@4096"}
    assert expected <= set(by_provider), sorted(by_provider)
    assert any(p.startswith("bw_floor@") for p in by_provider)
    for r in rows:
        assert r["shape"] == "smollm2" and r["dtype"] == "fp32" and r["rows"] == "1"
        assert r["machine"] and int(r["cpus"]) >= 1 and r["torch"]
        p20, p50, p80 = _f(r, "p20_ms"), _f(r, "p50_ms"), _f(r, "p80_ms")
        assert 0 < p20 <= p50 <= p80 < 60_000, r
        assert _f(r, "floor_ms") > 0 and _f(r, "copy_bw_gbs") > 0
    assert _f(by_provider["inductor_dense"], "ratio_vs_inductor_dense") == pytest.approx(1.0)
    for n in (1000, 3000, 4096):
        r = by_provider[f"microspec@{n}"]
        assert r["check"] == "ok", r["check"]
        assert int(r["active_rows"]) == n
        assert int(r["graphs_during_timing"]) == 0  # a changing vocabulary never recompiles
        assert int(r["n_samples"]) >= 3
    # the floor grows with the rows that must be read
    floors = sorted((int(r["active_rows"]), _f(r, "floor_ms")) for r in rows
                    if r["provider"].startswith("bw_floor@"))
    assert [f for _, f in floors] == sorted(f for _, f in floors)


def test_draft_step_smoke_rows(smoke_results):
    rows = _read(smoke_results / "draft_step.csv")
    by_provider = {r["provider"]: r for r in rows}
    assert {"inductor_dense", "inductor_frspec32k", "microspec", "layer_only", "observe60",
            "auto_observe"} <= set(by_provider), sorted(by_provider)
    for r in rows:
        p20, p50, p80 = _f(r, "p20_ms"), _f(r, "p50_ms"), _f(r, "p80_ms")
        assert 0 < p20 <= p50 <= p80 < 600_000, r
    ms = by_provider["microspec"]
    assert ms["check"] == "ok"
    assert 3000 <= _f(ms, "mean_vocab_size") <= 4096
    assert _f(ms, "ratio_vs_dense") > 0 and _f(ms, "observe60_ms") > 0
    assert 0 < _f(ms, "observe_share") < 1
    assert _f(by_provider["inductor_dense"], "ratio_vs_dense") == pytest.approx(1.0)


def test_compile_smoke_rows(smoke_results):
    rows = _read(smoke_results / "compile.csv")
    by_provider = {r["provider"]: r for r in rows}
    assert {"inductor_dense", "microspec", "inductor_frspec32k", "layer_only"} <= set(by_provider)
    for r in rows:
        assert int(r["recompiles_after_warmup"]) == 0, r
        assert int(r["unique_graphs_after_warmup_all"]) == 0, r
        assert int(r["graphs_first_step"]) >= 1
        assert _f(r, "first_step_s") > 0
    for name in ("inductor_dense", "microspec"):
        assert int(by_provider[name]["steps_after_warmup"]) >= 8
    assert int(by_provider["microspec"]["sparse_calls"]) > 0


def test_plot_on_smoke_csvs(smoke_results):
    from microspec_compile.analysis.results import append_rows

    os.environ["MICROSPEC_RESULTS_DIR"] = str(smoke_results)
    try:
        append_rows("coverage.csv", [
            {"tokenizer": "llama3", "dataset": "mtbench", "policy": policy, "coverage": cov,
             "mean_size": size}
            for policy, cov, size in (("context", 0.78, 110.0), ("context+core1000", 0.91, 1041.0),
                                      ("frspec32k", 0.95, 32768.0))
        ])
    finally:
        del os.environ["MICROSPEC_RESULTS_DIR"]
    proc = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--results", str(smoke_results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("head_latency.png", "draft_step_breakdown.png", "coverage.png"):
        png = smoke_results / name
        assert png.exists(), proc.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_paths_smoke(tmp_path):
    """bench_paths.py: both CPU kernel paths run and report a ratio to the dense head."""
    env = {**os.environ, "MICROSPEC_RESULTS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_paths.py"), "--vocab", "3000",
                           "--hidden", "64", "--active", "300", "--rounds", "3"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _read(tmp_path / "paths.csv")
    assert {r["provider"] for r in rows} == {"dense", "torch", "inductor"}
    assert all(_f(r, "p50_ms") > 0 for r in rows)


def test_host_overhead_smoke(tmp_path):
    """bench_host_overhead.py: every call is timed, the difference to dense is printed and
    one row per call lands in host_overhead.csv."""
    env = {**os.environ, "MICROSPEC_RESULTS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_host_overhead.py"), "--rounds",
                           "20", "--warmup", "2"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "microspec - dense: " in proc.stdout
    rows = _read(tmp_path / "host_overhead.csv")
    assert {r["what"] for r in rows} == {"dense", "microspec", "microspec inductor",
                                         "op sparse_topk", "kernel sparse_topk", "op observe",
                                         "kernel observe"}
    assert all(_f(r, "median_us") > 0 for r in rows)
