#!/usr/bin/env bash
# The GPU check, in one script for a machine with an NVIDIA GPU (sm_80 or newer), nvcc and CMake:
#   1. build the CUDA backend and its test programs (cuBLAS + cuBLASLt from the toolkit, from
#      $CUBLAS_ROOT, or from python3's nvidia-cublas wheel; the built-in GEMM without them),
#   2. the op-by-op CPU-vs-CUDA suite (test/cuda/backend_ops_test.cu),
#   3. the golden HF-parity suite on the CUDA device (LORAPLEX_DEVICE=cuda npx vitest run
#      test/golden), when node and node_modules are there; the addon is rebuilt with CUDA first.
#      fp32 exact on every fixture (decode steps through CUDA graphs, the default), and the BF16
#      fixture under `auto` (BF16 activations, KV, adapter rows) within the CPU's BF16 bounds,
#   4. the decode benchmark (test/cuda/bench_decode.cu): batch 1/16/64 x 0/8/64 adapters on a
#      Llama-7B-shaped random BF16 model built on the GPU, in three modes (fp32 eager, BF16 eager,
#      BF16 with CUDA graphs), the device's measured bandwidth and the issue #19 targets.
# Logs go to $OUT (the device tool's result folder) or build/device-check. Every stage has its own
# time limit; the whole script is planned for well under 8 minutes on 16 cores. Exits 1 if any stage
# that ran failed; a stage that cannot run here (no node) is reported SKIPPED.
# Usage: bash test/cuda/device-check.sh        (from anywhere; it cds to the repository root)
# Environment: CUBLAS_ROOT=<dir> to choose cuBLAS; LORAPLEX_SKIP_GOLDEN=1 to leave out stage 3.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG_DIR=${OUT:-build/device-check}
mkdir -p "$LOG_DIR"
JOBS=$(nproc 2>/dev/null || echo 4)
T0=$(date +%s)
declare -a SUMMARY=()
FAILED=0

note() { echo "== $* (t=$(($(date +%s) - T0))s)"; }
# stage NAME LIMIT_SECONDS LOG 'COMMAND': runs the shell command with a time limit, tees its output.
stage() {
  local name=$1 limit=$2 log=$3 cmd=$4
  note "$name"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | tee "$LOG_DIR/$log"
  local rc=${PIPESTATUS[0]}
  local dt=$(($(date +%s) - t))
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("PASS    $name (${dt}s)")
  else
    [ "$rc" -eq 124 ] && echo "$name: timed out after ${limit}s"
    SUMMARY+=("FAIL    $name (rc=$rc, ${dt}s)")
    FAILED=1
  fi
  # A GPU program that found no usable GPU exits 0 after a SKIPPED line: on this machine that is a failure.
  if [ "$rc" -eq 0 ] && grep -q '^SKIPPED: no CUDA device' "$LOG_DIR/$log"; then
    SUMMARY[${#SUMMARY[@]}-1]="FAIL    $name: SKIPPED, no usable GPU"
    FAILED=1
    rc=1
  fi
  return "$rc"
}

note "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH (CMake looks for it too)"

# cuBLAS + cuBLASLt: $CUBLAS_ROOT, else the toolkit (CMake finds it itself), else the pip wheel
# python3 has (a folder with include/cublas_v2.h, include/cublasLt.h and lib/libcublasLt.so*; the
# GEMM uses cuBLAS for fp32 activations and cuBLASLt for BF16 ones, so both or neither).
if [ -z "${CUBLAS_ROOT:-}" ]; then
  hdr=$(python3 - <<'EOF' 2>/dev/null
import os
try:
    import nvidia
    for root in nvidia.__path__:
        for d, _, files in os.walk(root):
            if "cublas_v2.h" in files and "cublasLt.h" in files:
                top = os.path.dirname(d)
                libs = [f for sub in ("lib", "lib64") if os.path.isdir(os.path.join(top, sub))
                        for f in os.listdir(os.path.join(top, sub))]
                if any(f.startswith("libcublasLt.so") for f in libs) and any(f.startswith("libcublas.so") for f in libs):
                    print(top); raise SystemExit
except ImportError:
    pass
EOF
)
  [ -n "$hdr" ] && CUBLAS_ROOT=$hdr
fi
echo "CUBLAS_ROOT=${CUBLAS_ROOT:-<toolkit or none>}"
CUBLAS_ARG=""
[ -n "${CUBLAS_ROOT:-}" ] && CUBLAS_ARG=$(printf '%q' "$CUBLAS_ROOT")

# 1. Build (plain cmake: no Node needed for the test programs).
BUILD="cmake -S . -B build/cuda -DLORAPLEX_NATIVE_ONLY=ON -DLORAPLEX_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  ${CUBLAS_ARG:+-DCUBLAS_ROOT=$CUBLAS_ARG} && cmake --build build/cuda -j$JOBS --target backend_ops_test bench_decode"
if stage "build (CUDA backend, backend_ops_test, bench_decode)" 300 build.log "$BUILD"; then
  # 2. Op-by-op suite.
  stage "backend_ops_test (CUDA vs CPU, op by op and whole backend)" 240 ops.log ./build/cuda/backend_ops_test
fi

# 3. Golden parity on CUDA, through the Node addon (needs node, node_modules, and the engine's
#    LORAPLEX_DEVICE support).
if [ -n "${LORAPLEX_SKIP_GOLDEN:-}" ]; then
  note "golden parity"
  echo "SKIPPED: LORAPLEX_SKIP_GOLDEN is set"
  SUMMARY+=("SKIPPED golden parity (LORAPLEX_SKIP_GOLDEN)")
elif command -v node >/dev/null && [ -x node_modules/.bin/vitest ] && [ -x node_modules/.bin/cmake-js ]; then
  GOLDEN="CMAKE_BUILD_PARALLEL_LEVEL=$JOBS node_modules/.bin/cmake-js compile --CDCMAKE_BUILD_TYPE=Release --CDLORAPLEX_CUDA=ON \
    ${CUBLAS_ARG:+--CDCUBLAS_ROOT=$CUBLAS_ARG} && LORAPLEX_DEVICE=cuda node_modules/.bin/vitest run test/golden"
  stage "golden parity on CUDA (LORAPLEX_DEVICE=cuda vitest run test/golden)" 300 golden.log "$GOLDEN"
else
  note "golden parity"
  echo "SKIPPED: golden parity on CUDA needs node and node_modules (npm ci) on this machine"
  SUMMARY+=("SKIPPED golden parity (no node / node_modules here)")
fi

# 4. Benchmark.
if [ -x build/cuda/bench_decode ]; then
  stage "bench_decode (Llama-7B shapes, BF16)" 240 bench.log ./build/cuda/bench_decode
fi

note "summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$LOG_DIR/summary.txt"
echo "total $(($(date +%s) - T0)) s"
exit "$FAILED"
