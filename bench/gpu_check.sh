#!/usr/bin/env bash
# GPU check of the Triton / Inductor kernel paths, for a CUDA machine.
#
#   1. tests/test_kernels.py natively (TRITON_INTERPRET unset: CUDA tensors, compiled Triton);
#   2. no host sync in a decode step: observe + observe_async + sparse head (triton and torch
#      paths) under torch.cuda.set_sync_debug_mode("error");
#   3. latency table: sparse head (triton, torch, inductor) vs dense head, V=128256 H=4096
#      bf16, rows 1 / 10 / 60, with the memory-bandwidth floor beside each time.
#
# Everything is appended to bench/results/gpu_check.txt (override with $GPU_CHECK_OUT).
# Usage: bash bench/gpu_check.sh [--quick]   (--quick: fewer iterations, no Inductor dense)
# Exit status: non-zero if any step failed (the later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${GPU_CHECK_OUT:-bench/results/gpu_check.txt}
mkdir -p "$(dirname "$OUT")"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
QUICK=0; [ "${1:-}" = "--quick" ] && QUICK=1
status=0

log() { echo "$*" | tee -a "$OUT"; }

log "=== gpu_check $(date -Iseconds) $(hostname) ==="
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to torch: nothing to check here (CPU checks: pytest tests/test_kernels.py)"
    exit 1
fi
"$PY" - <<'PY' 2>&1 | tee -a "$OUT"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, triton {triton.__version__}")
PY

log "--- 1. tests/test_kernels.py (native Triton on CUDA)"
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 25 | tee -a "$OUT"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=1
log "tests: exit $rc in $(( $(date +%s) - start )) s"

log "--- 2. no host sync in a decode step"
"$PY" bench/gpu_head_latency.py --sync-check 2>&1 | tail -n 15 | tee -a "$OUT"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=1

log "--- 3. head latency (ms, median; floor = bytes moved / copy bandwidth)"
if [ "$QUICK" = 1 ]; then
    "$PY" bench/gpu_head_latency.py --iters 20 --no-compile --out "$OUT" 2>&1 | tail -n 5
else
    "$PY" bench/gpu_head_latency.py --out "$OUT" 2>&1 | tail -n 5
fi
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=1 && log "latency table failed: exit $rc"

log "=== gpu_check done: status $status ==="
exit $status
