#!/usr/bin/env bash
# GPU check of microspec-compile in one run (--quick: under 5 minutes; else under 10).
#
#   a. native kernel tests: tests/test_kernels.py, tests/test_async_gather.py and
#      tests/test_device_guards.py (CUDA tensors, compiled Triton; the kernels agreeing
#      through evictions, the async gather, its capture, the compiled step, the loops
#      and the training step on CUDA under the device guard). --quick: their cuda cases
#      (-m cuda) but the Inductor-path compile and the training step;
#   b. no host sync: the ops (observe / observe_start + observe_wait / sparse head, through evictions)
#      and the compiled draft step, async and sync gather (--quick: async), with and
#      without CUDA graphs, under torch.cuda.set_sync_debug_mode("error");
#   c. the compiled EAGLE-2-shaped draft step at Llama-3-8B shapes (bf16, random weights,
#      one decoder layer over a 512-token KV cache, 1 row then 10 rows per depth, depth 6):
#      dense vs microspec sync vs microspec async, each with and without CUDA graphs, with
#      the memory-bandwidth floor beside each figure (--quick: dense and microspec sync, the default,
#      CUDA graphs only);
#   d. full EAGLE-2 rounds end to end (issue 26, point 4): a Llama-3-8B-shaped target with all
#      32 layers (--quick: 2), random weights, bf16; dense, FR-Spec (32k ids) and microspec
#      heads built by spec.prepare at the same tree (depth 6, top_k 10, 60 tokens, no lookup);
#      per-round medians of draft / verification / round time, tokens per round, each head's
#      end-to-end ratio to dense and microspec's goals (>= 1.35x end to end, draft <= 0.5x);
#      the greedy outputs of the three heads must agree.
#
# Each step runs under its own time limit and stops at its first failure (pytest -x, the
# scripts' --fail-fast); a failed step is recorded and the next one runs. Writes
# bench/results/gpu_check.txt (override with $GPU_CHECK_OUT): every step's output, then a
# table of the steps. Exit status: 1 if any step failed (or no GPU).
# Usage: bash bench/gpu_check.sh [--quick]     (--quick: fewer tests, providers, iterations)
# Runs the machine's own python3 (or $PY); installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${GPU_CHECK_OUT:-bench/results/gpu_check.txt}
mkdir -p "$(dirname "$OUT")"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
QUICK=0; [ "${1:-}" = "--quick" ] && QUICK=1
status=0
summary=()

log() { echo "$*" | tee -a "$OUT"; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log its output, record the result.
step() {
    local name=$1 limit=$2; shift 2
    log "--- $name (limit ${limit} s): $*"
    local start rc; start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$OUT"
    rc=${PIPESTATUS[0]}
    local secs=$(( $(date +%s) - start )) result=ok
    if [ "$rc" -ne 0 ]; then
        status=1; result="FAILED (exit $rc)"
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && result="FAILED (timed out)"
    fi
    log "$name: $result in ${secs} s"
    summary+=("$(printf '%-26s %-22s %5s s' "$name" "$result" "$secs")")
}

: > "$OUT"
log "=== gpu_check $(date -Iseconds) $(hostname) quick=$QUICK ==="
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "no CUDA device visible to torch ($PY): nothing to check here (CPU: make test; bench scripts: --cpu-smoke)"
    exit 1
fi
"$PY" - <<'PY' 2>&1 | tee -a "$OUT"
import torch, triton, transformers
p = torch.cuda.get_device_properties(0)
print(f"device {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
      f"triton {triton.__version__}, transformers {transformers.__version__}")
PY

if ! "$PY" -c "import microspec_compile.kernels.async_gather" 2>>"$OUT"; then
    log "microspec_compile does not import: install it first with"
    log "  $PY -m pip install --no-deps --no-build-isolation -e ."
    exit 1
fi

# Limits add up to 285 s with --quick (under 5 minutes: a rerun fits in a session's GPU time), to
# 570 s without. Every step stops at its first failure: pytest -x, the scripts --fail-fast.
# --quick's a-c limits are 1.3-1.5x the times of the H200 run of 2026-12-04 (a 48-53 s, b1 14-20,
# b2 30-38, c 31-35; bench/results/gpu_check.txt). Step d's are estimates until a GPU run: that
# run's d took 39 s for two heads (about 19 s of start-up and model building, 18 s compiling the
# dense head, 2 s the microspec one); a third Inductor head (FR-Spec) adds about 20 s (--quick:
# about 60 s in all, limit 85). With 32 layers, building the target (~16 GB) adds 10-20 s and the
# timed requests up to ~25 s (3 heads x 24 rounds x <= 0.35 s): about 100-120 s, limit 180.
PYTEST=("$PY" -m pytest -q -x -p no:cacheprovider)
TESTS=(tests/test_kernels.py tests/test_async_gather.py tests/test_device_guards.py)
if [ "$QUICK" = 1 ]; then
    step "a. kernel tests (quick)" 70 "${PYTEST[@]}" "${TESTS[@]}" -m cuda \
        -k "not inductor and not None-cuda and not training"
    step "b1. no host sync: ops" 30 "$PY" bench/gpu_head_latency.py --sync-check --fail-fast
    step "b2. no host sync: step" 55 "$PY" bench/gpu_draft_step.py --sync-check --shape smollm2 \
        --providers ms_async --fail-fast
    step "c. draft step (quick)" 45 "$PY" bench/gpu_draft_step.py --quick --cuda-graphs-only \
        --providers dense,ms_sync --fail-fast
    step "d. EAGLE-2 round (quick)" 85 "$PY" bench/gpu_eagle_round.py --quick --fail-fast
else
    step "a. kernel tests" 160 "${PYTEST[@]}" "${TESTS[@]}"
    step "b1. no host sync: ops" 30 "$PY" bench/gpu_head_latency.py --sync-check --fail-fast
    step "b2. no host sync: step" 70 "$PY" bench/gpu_draft_step.py --sync-check --shape smollm2 \
        --fail-fast
    step "c. draft step" 130 "$PY" bench/gpu_draft_step.py --fail-fast
    step "d. EAGLE-2, 32 layers" 180 "$PY" bench/gpu_eagle_round.py --layers 32 \
        --fail-fast
fi

log "=== steps ==="
for line in "${summary[@]}"; do log "$line"; done
log "=== gpu_check done: status $status ==="
exit $status
