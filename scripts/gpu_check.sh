#!/usr/bin/env bash
# The GPU check of a change, in one device call (CI has no GPU: this is what stops a GPU regression from landing).
#   bash scripts/gpu_check.sh [COMMIT]          on a CUDA machine, from the repo root
# Everything it writes goes under $GPU_CHECK_DIR (default /tmp/gpu_check); when $OUT is set (the device tool's folder
# that comes back), the summary line's CSV and the six logs worth reading are copied there, and nothing else: a
# folder of many files does not come back whole. Pass COMMIT where the checkout's git metadata may be stale (a copy
# of a working tree).
# Runs, in this order: the quick GPU suite (pytest -m "gpu and not slow" tests/gpu, in parallel workers) beside the
# kernels under compute-sanitizer memcheck and the making of a small export; then, alone on the machine, what
# measures speed: the tests marked `timing`, benchmarks/bsr_linear.py --quick and the side-by-side serving script on
# that export. Prints one summary line and appends it to docs/data/gpu_checks.csv (commit it with the change).
# Exit status: non-zero when a test fails or the sanitizer reports an error.
# Stopped from outside (SIGTERM or SIGINT: a `timeout` around it, a device call's limit), it stops its stages and
# still writes the line, with stopped=TERM among its exit codes and "-" for each stage that did not run.
set -uo pipefail
cd "$(dirname "$0")/.."
COMMIT=${1:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
BACK=${OUT:-}
OUT=${GPU_CHECK_DIR:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SUPERBLOCK_CACHE_DIR=${SUPERBLOCK_CACHE_DIR:-$OUT/tuning}
WORKERS=${GPU_CHECK_WORKERS:-6}
T=${GPU_CHECK_STAGE_TIMEOUT:-240}  # seconds a stage may take; one that runs out counts as failed (exit code 124)
# the sanitizer runs beside the quick suite and shares the machine with it: at 240 s it was near its limit in earlier
# checks (tests 268-269 s in all) and once ran out (about 95% of its tests done); 330 s keeps the check near 540 s
T_SAN=${GPU_CHECK_SANITIZE_TIMEOUT:-330}
CSV=${GPU_CHECK_CSV:-docs/data/gpu_checks.csv}  # where the line is appended
SERVE=${SERVE_REPRO:-../shared/repro/serve_side_by_side.py}  # a device copy of a tree lacks ../shared: pass SERVE_REPRO
[[ -f "$SERVE" ]] || echo "no serving script at $SERVE: the serve stage is skipped (serve=127); set SERVE_REPRO" >&2
t0=$(date +%s)
rm -rf "$OUT/export"  # a second check on the same machine writes a fresh export, never onto the last one
quick_rc=- timing_rc=- san_rc=- export_rc=- bench_rc=- serve_rc=- t_tests="" stopped="" pids=()  # "-": not run

exec 3>&1 4>&2  # the check's own output: a trap runs inside the redirections of the stage it interrupts
finish() {  # the summary line, and the logs' way back: at the end, or at once when the check is stopped from outside
  trap - TERM INT
  python scripts/gpu_check_summary.py --commit "$COMMIT" --out "$OUT" --seconds "$(( $(date +%s) - t0 ))" \
    --test-seconds "$t_tests" --csv "$CSV" \
    --rc "quick=$quick_rc,timing=$timing_rc,sanitize=$san_rc,export=$export_rc,bench=$bench_rc,serve=$serve_rc$stopped" \
    >&3 2>&4
  local rc=$?
  if [[ -n "$BACK" && "$BACK" != "$OUT" ]]; then  # the line and the logs travel back with the device tool's folder
    mkdir -p "$BACK"
    cp "$CSV" "$OUT"/{quick,timing,sanitize,serve}.log "$OUT"/bsr_linear_quick.md "$BACK/" 2>/dev/null
  fi
  return $rc
}
stopped_from_outside() {  # a time limit around the whole check: stop the stages, still write the line
  kill "${pids[@]}" 2>/dev/null
  stopped=",stopped=$1"
  finish
  exit 143
}
trap 'stopped_from_outside TERM' TERM
trap 'stopped_from_outside INT' INT

stage() {  # stage LIMIT CMD...: in the background and waited for, so that a signal's trap runs at once (bash runs
  # a trap only after a foreground command has ended)
  local limit=$1
  shift
  timeout "$limit" "$@" &
  local pid=$!
  pids+=("$pid")
  wait "$pid"
}

timeout "$T_SAN" bash scripts/sanitize_kernels.sh > "$OUT/sanitize.log" 2>&1 &
san_pid=$!
timeout "$T" python scripts/gpu_check_export.py "$OUT/export" > "$OUT/export.log" 2>&1 &
export_pid=$!
pids+=("$san_pid" "$export_pid")
stage "$T" python -m pytest -q -p no:cacheprovider -m "gpu and not slow and not timing" -n "$WORKERS" --durations=25 \
  tests/gpu --junitxml="$OUT/quick.xml" > "$OUT/quick.log" 2>&1
quick_rc=$?
wait $san_pid; san_rc=$?
wait $export_pid; export_rc=$?

# speed from here on: nothing else runs
stage "$T" python -m pytest -q -p no:cacheprovider -m "gpu and not slow and timing" tests/gpu \
  --junitxml="$OUT/timing.xml" > "$OUT/timing.log" 2>&1
timing_rc=$?
t_tests=$(( $(date +%s) - t0 ))
stage "$T" python benchmarks/bsr_linear.py --quick --out "$OUT" --tag bsr_linear_quick > "$OUT/bsr_linear.log" 2>&1
bench_rc=$?
serve_rc=127
if [[ -f "$SERVE" && $export_rc -eq 0 ]]; then
  EXP="$OUT/export" BATCHES=1,8,32,256 stage "$T" python "$SERVE" > "$OUT/serve.log" 2>&1
  serve_rc=$?
fi
finish
