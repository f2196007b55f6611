#!/usr/bin/env bash
# Run the GPU kernel tests under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses in every
# kernel launch: the Triton tiled and decode kernels). On a CUDA machine:
#   bash scripts/sanitize_kernels.sh [extra pytest args]
# Exit status: non-zero when the sanitizer reports an error or a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [[ ! -x "$SANITIZER" ]]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
# the sanitizer slows every launch ~100x: the awkward-shape tests, not the 50,432-token problems.
# SUPERBLOCK_UNDER_SANITIZER tells the tests where they run: under memcheck, Python frames of a kernel launch outlive
# their calls (held outside Python's garbage collector), so the tensors they reference stay allocated; torch.compile's
# reduce-overhead mode reports such a tensor in its graph pool as a leak. The one test that runs that mode skips it
# here and runs it in the quick suite (docs/benchmarks.md, "The fifth GPU check").
export SUPERBLOCK_UNDER_SANITIZER=1
exec "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
  python -m pytest -q -p no:cacheprovider -m gpu -k "not 50432" \
  tests/gpu/test_kernels_gpu.py tests/gpu/test_decode_gpu.py tests/gpu/test_launch_gpu.py "$@"
