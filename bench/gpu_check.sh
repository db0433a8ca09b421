#!/usr/bin/env bash
# The one command for a lent GPU machine (H100/H200; python3 with torch + CUDA + triton,
# no internet, 10 minutes per command):
#   1. builds the extension in place for this machine's arch only (sm_90 by default),
#   2. runs the CUDA / Triton tests against the dense reference (fresh random inputs,
#      poisoned outputs, odd shapes, empty rows) -- tests/test_cuda.py,
#   3. runs the GPU benchmark (cuBLAS fp32 / TF32 / bf16, cuSPARSE, ours),
# and writes $OUT/gpu-results.json, $OUT/gpu-tests.txt and $OUT/gpu-check.log.
# Copy them to bench/results/<device>-<date>.json and commit.
# Stages: `bench/gpu_check.sh [all|build|test|bench]` (default all), so a session can split
# the work over several 10-minute commands; `all` fits one: the bench stops starting new
# cases GPU_CHECK_SECONDS (default 520) after the script started, target cases first, and
# lists the ones it skipped.
set -uo pipefail
STAGE="${1:-all}"
# Everything must fit one command of the GPU machine (10 minutes) and the session's device
# time: the benchmark gets what is left of GPU_CHECK_SECONDS after build and tests.
T0=$(date +%s)
BUDGET="${GPU_CHECK_SECONDS:-520}"
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-check}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME="$d" && break; done
fi
echo "== $(date -Is) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null) stage=$STAGE" | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

if [ "$STAGE" = all ] || [ "$STAGE" = build ]; then
echo "== build" | tee -a "$LOG"
start=$(date +%s)
$PY setup.py build_ext --inplace >>"$LOG" 2>&1 || { echo "BUILD FAILED (see $LOG)"; tail -40 "$LOG"; exit 1; }
echo "build took $(( $(date +%s) - start )) s" | tee -a "$LOG"
$PY -m sparsekernels info --json > "$OUT/info.json" 2>>"$LOG"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
echo "== tests" | tee -a "$LOG"
if ! $PY -c "import pytest" 2>/dev/null && [ -d bench/.wheels ]; then
  # The GPU machine has no internet: pytest comes from wheels carried with the tree
  # (`make gpu-wheels` here, then run with carry=["bench/.wheels"]).
  $PY -m pip install -q --no-index --find-links bench/.wheels pytest >>"$LOG" 2>&1 || true
fi
if $PY -c "import pytest" 2>/dev/null; then
  # Capped so the benchmark keeps its share of the command's 10 minutes.
  timeout "${GPU_TEST_SECONDS:-240}" $PY -m pytest tests/test_cuda.py tests/test_triton_kernels.py -q -p no:cacheprovider -rs -x \
    2>&1 | tee "$OUT/gpu-tests.txt" | tail -15
else
  echo "pytest is not available: tests not run (carry bench/.wheels from 'make gpu-wheels')" | tee "$OUT/gpu-tests.txt"
fi

fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
echo "== benchmark" | tee -a "$LOG"
$PY - <<PYEOF 2>&1 | tee -a "$LOG" | tail -40
import json, torch
from sparsekernels.bench import gpu
left = max(60, $BUDGET - ($(date +%s) - $T0) - 30)
print("benchmark time budget", left, "s", flush=True)
import os
tests = open("$OUT/gpu-tests.txt").read()[-4000:] if os.path.exists("$OUT/gpu-tests.txt") else "not run"

def save(payload):  # after every case: a command killed at its limit still leaves results
    json.dump({**payload, "tests": tests}, open("$OUT/gpu-results.json", "w"), indent=1)

payload = gpu.run(progress=lambda s: print("done", s, flush=True), time_budget_s=left, checkpoint=save)
save(payload)
for r in payload["results"]:
    print(r["batch"], r["in_features"], r["out_features"], r["sparsity"], r.get("error") or {k: round(v, 2) for k, v in r["speedup"].items()})
print("skipped for time:", payload["skipped_for_time"])
# A backend "auto" rejected disagreed with the reference (or failed): a kernel bug to fix.
print("auto rejected:", [(e["op"], e["key"], e["rejected"]) for e in payload["auto_choices"] if e["rejected"]] or "none")
PYEOF
fi
echo "== done: $OUT" | tee -a "$LOG"
