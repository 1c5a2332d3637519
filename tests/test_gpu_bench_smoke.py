"""CPU smoke runs of the GPU check's Python parts (``bench/gpu_check.sh`` steps c, d).

Tiny shapes, no Inductor (``--eager``): what this catches is a broken script (names,
arguments, the table) before it reaches a GPU, not numbers. Each provider must run:
a failed one makes the script exit non-zero.
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
    bench_module("gpu_eagle_round").main(["--cpu-smoke", "--eager"])
    out = capsys.readouterr().out
    assert "\ndense " in out and "\nmicrospec " in out
    assert "greedy outputs equal: OK" in out


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
