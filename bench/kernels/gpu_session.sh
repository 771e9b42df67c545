#!/usr/bin/env bash
# One GPU session (H200): build the extension, run the GPU correctness tests (kernels and the cache
# manager) against the core reference, then the kernel benchmark. Writes logs + JSON + plot to $OUT (default bench/results).
#   bash bench/kernels/gpu_session.sh [tests|bench|all]
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds) bound each part so that a lease's command limit is never hit
# with nothing written; BENCH_ARGS passes options to bench_kernels.py (e.g. fewer contexts, or
# `--sections append --out DIR/append-h200.json`); TEST_K selects tests (pytest -k, e.g. 'encode or append').
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results}
MODE=${1:-all}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/env.log"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/env.log"
t0=$(date +%s)
$PY -m mosaickv.ops.compile > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
rc=0
if [[ $MODE == tests || $MODE == all ]]; then
  t0=$(date +%s)
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider --durations=5 python/tests/test_ops_gpu.py python/tests/test_cache_gpu.py ${TEST_K:+-k "$TEST_K"} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -40
  rc=${PIPESTATUS[0]}
  echo "tests: $(( $(date +%s) - t0 )) s, rc $rc"
fi
if [[ $MODE == bench || $MODE == all ]]; then
  t0=$(date +%s)
  timeout "${BENCH_TIMEOUT:-900}" $PY bench/kernels/bench_kernels.py --out "$OUT/kernels-h200.json" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log"
  rc=$(( rc | PIPESTATUS[0] ))
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
exit $rc
