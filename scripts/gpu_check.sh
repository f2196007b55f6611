#!/usr/bin/env bash
# The GPU check of a change, in one device call (CI has no GPU: this is what stops a GPU regression from landing).
#   bash scripts/gpu_check.sh [COMMIT]          on a CUDA machine, from the repo root; logs under $OUT (or /tmp)
# Runs: the quick GPU suite (pytest -m "gpu and not slow" tests/gpu, in parallel workers, the timing tests alone
# after them), the kernels under compute-sanitizer memcheck, benchmarks/bsr_linear.py --quick, and the side-by-side
# serving script on a small export. Prints one summary line and appends it to docs/data/gpu_checks.csv (commit it).
# Exit status: non-zero when a test fails or the sanitizer reports an error.
set -uo pipefail
cd "$(dirname "$0")/.."
COMMIT=${1:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SUPERBLOCK_CACHE_DIR=${SUPERBLOCK_CACHE_DIR:-$OUT/tuning}
WORKERS=${GPU_CHECK_WORKERS:-6}
t0=$(date +%s)
# timing-sensitive tests (marked `timing`) run alone, after the parallel part, so that other workers' compiles do
# not load the host they measure
python -m pytest -q -p no:cacheprovider -m "gpu and not slow and not timing" -n "$WORKERS" tests/gpu \
  --junitxml="$OUT/quick.xml" > "$OUT/quick.log" 2>&1
quick_rc=$?
python -m pytest -q -p no:cacheprovider -m "gpu and not slow and timing" tests/gpu \
  --junitxml="$OUT/timing.xml" > "$OUT/timing.log" 2>&1
timing_rc=$?
t_tests=$(( $(date +%s) - t0 ))
bash scripts/sanitize_kernels.sh -n "$WORKERS" > "$OUT/sanitize.log" 2>&1
san_rc=$?
python benchmarks/bsr_linear.py --quick --out "$OUT" --tag bsr_linear_quick > "$OUT/bsr_linear.log" 2>&1
bench_rc=$?
SERVE=${SERVE_REPRO:-../shared/repro/serve_side_by_side.py}
serve_rc=127
if [[ -f "$SERVE" ]]; then
  python scripts/gpu_check_export.py "$OUT/export" > "$OUT/export.log" 2>&1 \
    && EXP="$OUT/export" BATCHES=1,8,32,256 python "$SERVE" > "$OUT/serve.log" 2>&1
  serve_rc=$?
fi
python scripts/gpu_check_summary.py --commit "$COMMIT" --out "$OUT" --seconds "$(( $(date +%s) - t0 ))" \
  --test-seconds "$t_tests" --rc "quick=$quick_rc,timing=$timing_rc,sanitize=$san_rc,bench=$bench_rc,serve=$serve_rc" \
  --csv docs/data/gpu_checks.csv
rc=$?
cp docs/data/gpu_checks.csv "$OUT/" 2>/dev/null  # the device tool brings $OUT back: the line travels with it
exit $rc
