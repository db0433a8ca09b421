#!/usr/bin/env bash
# The one command for a lent GPU machine (H100/H200; python3 with torch + CUDA + triton,
# no network, no package index, maybe no pip / ninja / pytest, 10 minutes per command):
#   0. prepare: the wheels carried in bench/.wheels (`make gpu-wheels`: pytest, ninja) go
#      into a private folder ($GPU_CHECK_SITE, default bench/.gpu-site) on PYTHONPATH /
#      PATH -- pip --target, or unpacked with zipfile where there is no pip -- and the
#      machine is logged (GPU, arch, torch, triton, setuptools, nvcc, CUDA_HOME, ninja,
#      cuSPARSELt),
#   1. build: the extension in place for this GPU's arch only (nvidia-smi compute_cap),
#      with ninja so the sources compile in parallel,
#   2. test: the CUDA and Triton tests, compiled on the GPU, against the dense reference
#      (tests/test_cuda.py, tests/test_triton_kernels.py, tests/test_autocast.py), capped by the time left and
#      keeping going past failures (--maxfail budget),
#   3. bench: the GPU benchmark (cuBLAS fp32 / TF32 / bf16, cuSPARSE, ours) with what is
#      left of the time budget, target cases first.
# Writes $OUT/gpu-results.json, $OUT/gpu-tests.txt, $OUT/info.json and $OUT/gpu-check.log;
# copy gpu-results.json to bench/results/<device>-<date>.json and commit.
# Stages: `bench/gpu_check.sh [all|STAGE[,STAGE...]]` with STAGE one of prepare, build,
# test, bench (prepare always runs first). `all` fits one command: the bench stops
# starting new cases GPU_CHECK_SECONDS (default 520) after the script started.
set -uo pipefail
STAGES="${1:-all}"
[ "$STAGES" = all ] && STAGES="prepare,build,test,bench"
want() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
T0=$(date +%s)
BUDGET="${GPU_CHECK_SECONDS:-520}"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-check}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
PY="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-bench/.wheels}"
SITE="${GPU_CHECK_SITE:-bench/.gpu-site}"
log() { echo "$*" | tee -a "$LOG"; }

# ---------------------------------------------------------------- prepare
log "== $(date -Is) stages=$STAGES budget=${BUDGET}s"
if [ -d "$WHEELS" ]; then
  $PY bench/gpu_site.py "$WHEELS" "$SITE" 2>&1 | tee -a "$LOG"
else
  log "no $WHEELS: nothing brought (run 'make gpu-wheels' and carry bench/.wheels)"
fi
if [ -d "$SITE" ]; then
  SITE_ABS="$(cd "$SITE" && pwd)"
  export PYTHONPATH="$SITE_ABS${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE_ABS/bin:$PATH"
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
  export TORCH_CUDA_ARCH_LIST="${CAP:-9.0}"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME="$d" && break; done
fi
log "gpu: $(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null || echo none)"
log "arch: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"
NVCC_VERSION="$("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | tail -1)"
log "nvcc: ${NVCC_VERSION:-not found}"
$PY - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib, shutil, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "setuptools", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        print(name, "missing:", type(exc).__name__, exc)
try:
    import torch
    from torch.utils import cpp_extension
    print("ninja:", "available" if cpp_extension.is_ninja_available() else "MISSING (one file at a time)",
          shutil.which("ninja"))
    print("cuda available:", torch.cuda.is_available(), "torch cuda", torch.version.cuda)
    sl = getattr(torch.backends, "cusparselt", None)
    print("cusparselt:", sl.version() if sl is not None and sl.is_available() else "not available")
except Exception as exc:  # noqa: BLE001
    print("torch probe failed:", exc)
PYEOF

write_info() { $PY -m sparsekernels info --json > "$OUT/info.json" 2>>"$LOG" || log "info --json failed (see log)"; }

# ---------------------------------------------------------------- build
if want build; then
  log "== build"
  start=$(date +%s)
  if ! $PY setup.py build_ext --inplace >>"$LOG" 2>&1; then
    log "BUILD FAILED (see $LOG)"; tail -40 "$LOG"; write_info; exit 1
  fi
  log "build took $(( $(date +%s) - start )) s"
  write_info
fi

# ---------------------------------------------------------------- test
if want test; then
  log "== tests"
  [ -s "$OUT/info.json" ] || write_info
  if $PY -c "import pytest" 2>/dev/null; then
    # Capped so the benchmark keeps its share of the command; at least 30 s.
    cap=$(( $(left) - 180 )); [ "$cap" -gt "${GPU_TEST_SECONDS:-240}" ] && cap="${GPU_TEST_SECONDS:-240}"
    [ "$cap" -lt 30 ] && cap=30
    TEST_FILES="${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_triton_kernels.py tests/test_autocast.py}"
    log "pytest $TEST_FILES --maxfail=${GPU_TEST_MAXFAIL:-25}, capped at ${cap}s"
    # shellcheck disable=SC2086
    # One Triton config per kernel in the tests (results, not speed; the benchmark autotunes).
    SPARSEKERNELS_TRITON_CONFIGS=first timeout "$cap" $PY -m pytest $TEST_FILES -q -p no:cacheprovider -rs --maxfail="${GPU_TEST_MAXFAIL:-25}" \
      2>&1 | tee "$OUT/gpu-tests.txt" | tail -25
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && log "tests stopped at the ${cap}s cap" | tee -a "$OUT/gpu-tests.txt"
    log "pytest exit code $rc"
  else
    log "pytest is not available: tests not run (carry bench/.wheels from 'make gpu-wheels')" | tee "$OUT/gpu-tests.txt"
  fi
fi

# ---------------------------------------------------------------- bench
if want bench; then
log "== benchmark"
$PY - <<PYEOF 2>&1 | tee -a "$LOG" | tail -40
import json, os
from sparsekernels.bench import gpu
left = max(60, $BUDGET - ($(date +%s) - $T0) - 30)
print("benchmark time budget", left, "s", flush=True)
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
log "== done: $OUT ($(( $(date +%s) - T0 )) s)"
