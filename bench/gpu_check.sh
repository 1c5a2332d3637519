#!/usr/bin/env bash
# GPU check of microspec-compile in one run (about 8 minutes at most on an H200).
#
#   a. native kernel tests: tests/test_kernels.py and tests/test_async_gather.py (CUDA
#      tensors, compiled Triton; the async gather, its capture and the compiled step);
#   b. no host sync: the ops (observe / observe_async / sparse head) and the compiled
#      draft step, async and sync gather, with and without CUDA graphs, under
#      torch.cuda.set_sync_debug_mode("error");
#   c. the compiled EAGLE-2-shaped draft step at Llama-3-8B shapes (bf16, random weights,
#      one decoder layer over a 512-token KV cache, 1 row then 10 rows per depth, depth 6):
#      dense vs microspec sync vs microspec async, each with and without CUDA graphs, with
#      the memory-bandwidth floor beside each figure;
#   d. a full EAGLE-2 round (draft tree + tree verification): Llama-3-8B-shaped target with
#      4 layers, random weights, bf16; dense vs microspec head; greedy outputs must agree.
#
# Each step runs under its own time limit; a failed step is recorded and the next one
# runs. Writes bench/results/gpu_check.txt (override with $GPU_CHECK_OUT): every step's
# output, then a table of the steps. Exit status: 1 if any step failed (or no GPU).
# Usage: bash bench/gpu_check.sh [--quick]     (--quick: fewer tests and iterations)
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

# Limits add up to 480 s (8 minutes) in both modes.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if [ "$QUICK" = 1 ]; then
    step "a. kernel tests (quick)" 120 "${PYTEST[@]}" tests/test_async_gather.py \
        tests/test_kernels.py -k "cuda or opcheck or observe or sm90"
    step "b1. no host sync: ops" 40 "$PY" bench/gpu_head_latency.py --sync-check
    step "b2. no host sync: step" 70 "$PY" bench/gpu_draft_step.py --sync-check --shape smollm2
    step "c. draft step (quick)" 150 "$PY" bench/gpu_draft_step.py --quick
    step "d. EAGLE-2 round (quick)" 100 "$PY" bench/gpu_eagle_round.py --quick
else
    step "a. kernel tests" 140 "${PYTEST[@]}" tests/test_async_gather.py tests/test_kernels.py
    step "b1. no host sync: ops" 40 "$PY" bench/gpu_head_latency.py --sync-check
    step "b2. no host sync: step" 70 "$PY" bench/gpu_draft_step.py --sync-check --shape smollm2
    step "c. draft step" 140 "$PY" bench/gpu_draft_step.py
    step "d. EAGLE-2 round" 90 "$PY" bench/gpu_eagle_round.py
fi

log "=== steps ==="
for line in "${summary[@]}"; do log "$line"; done
log "=== gpu_check done: status $status ==="
exit $status
