"""CPU smoke runs of the GPU check's Python parts (``bench/gpu_check.sh`` steps b, c, d).

Tiny shapes, no Inductor (``--eager``): what this catches is a broken script (names,
arguments, the table) before it reaches a GPU, not numbers. Each provider must run:
a failed one makes the script exit non-zero (with ``--fail-fast``, at once). The
argument sets are those ``gpu_check.sh --quick`` passes, plus the smoke switches; the
script's time limits are checked against the budget of a quick run.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return lambda name: importlib.import_module(name)


def test_draft_step_smoke(bench_module, capsys):
    bench_module("gpu_draft_step").main(["--cpu-smoke", "--eager"])
    out = capsys.readouterr().out
    for provider in ("dense", "ms_sync", "ms_async"):
        assert f"\n{provider} " in out
    assert "failed" not in out


def test_eagle_round_smoke(bench_module, capsys):
    """The three heads of issue 26 (dense, FR-Spec, microspec) built by ``spec.prepare`` run
    at the same tree, agree greedily, and microspec's line carries the end-to-end goal."""
    bench_module("gpu_eagle_round").main(["--cpu-smoke", "--eager"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for head in ("dense", "frspec", "microspec"):
        assert head in rows and "failed" not in rows[head], out
    assert "goal >= 1.35x over dense (not below 1.25x): " in rows["microspec"]
    assert "greedy outputs equal (dense, frspec, microspec): OK" in out
    assert "draft microspec/dense: " in out and "tokens per round equal: yes" in out


def test_eagle_round_layers(bench_module, capsys):
    """``--layers`` sets the target's depth (the full check passes 32: Llama-3-8B)."""
    bench_module("gpu_eagle_round").main(["--cpu-smoke", "--eager", "--layers", "3",
                                          "--heads", "dense,microspec"])
    out = capsys.readouterr().out
    assert "x 3 layers" in out and "greedy outputs equal (dense, microspec): OK" in out
    full = (BENCH / "gpu_check.sh").read_text().split('if [ "$QUICK" = 1 ]; then')[1]
    assert "bench/gpu_eagle_round.py --layers 32" in full.split("else")[1].replace("\\\n", " ")


def test_gpu_check_script_stops_without_a_gpu(tmp_path):
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run the whole check")
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True,
                            text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PY": sys.executable,
                                 "GPU_CHECK_OUT": str(tmp_path / "out.txt")})
    assert result.returncode == 1
    assert "no CUDA device visible" in result.stdout


# the arguments gpu_check.sh --quick passes (steps b1, b2, c, d), plus the CPU smoke switches
def test_head_latency_sync_check_smoke(bench_module, capsys):
    bench_module("gpu_head_latency").main(["--device", "cpu", "--smoke", "--sync-check",
                                           "--fail-fast"])
    assert "(triton, torch): OK" in capsys.readouterr().out


def test_draft_step_sync_check_smoke(bench_module, capsys):
    bench_module("gpu_draft_step").main(["--cpu-smoke", "--eager", "--sync-check",
                                         "--shape", "smollm2", "--providers", "ms_async",
                                         "--fail-fast"])
    out = capsys.readouterr().out
    assert "ms_async: 3 compiled tree steps ran" in out and "FAILED" not in out


def test_quick_argument_sets_smoke(bench_module, capsys):
    bench_module("gpu_draft_step").main(["--cpu-smoke", "--eager", "--quick",
                                         "--cuda-graphs-only", "--providers", "dense,ms_sync",
                                         "--fail-fast"])
    out = capsys.readouterr().out
    assert "\ndense " in out and "\nms_sync " in out and "ms_async" not in out
    bench_module("gpu_eagle_round").main(["--cpu-smoke", "--eager", "--quick", "--fail-fast"])
    assert "greedy outputs equal (dense, frspec, microspec): OK" in capsys.readouterr().out


def test_fail_fast_stops_at_the_first_failure(bench_module, monkeypatch, capsys):
    module = bench_module("gpu_draft_step")
    built = []

    def broken(provider, *args):
        built.append(provider)
        raise RuntimeError("broken provider (test)")

    monkeypatch.setattr(module, "build", broken)
    with pytest.raises(RuntimeError, match="broken provider"):
        module.main(["--cpu-smoke", "--eager", "--fail-fast"])
    assert built == ["dense"] and "failed: RuntimeError" in capsys.readouterr().out


def test_quick_check_fits_its_budget():
    """--quick's step limits add up to at most 285 s, under 5 minutes (a rerun must fit the GPU time of a
    session), every pytest step stops at its first failure and every script step fails fast."""
    import re

    script = (BENCH / "gpu_check.sh").read_text()
    quick = script.split('if [ "$QUICK" = 1 ]; then')[1].split("else")[0]
    steps = re.findall(r'step "[^"]+" (\d+) (.*?)(?<!\\)\n', quick.replace("\\\n", " "))
    assert len(steps) == 5
    assert sum(int(limit) for limit, _ in steps) <= 285
    for _, command in steps:
        assert "--fail-fast" in command or "PYTEST" in command, command
    assert re.search(r"PYTEST=\(.* -x .*\)", script)
