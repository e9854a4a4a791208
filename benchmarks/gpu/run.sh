#!/usr/bin/env bash
# The GPU path in one prepared command (gpu_check.py describes the phases and the budget):
#
#   bash benchmarks/gpu/run.sh [--out FILE] [--budget-s 450] [--commit SHA]    # H100 / H200: < 8 minutes
#   bash benchmarks/gpu/run.sh --dry-run [--out FILE]                           # CPU (CI): ~30 s when idle
#
# The Python budget (450 s) skips what would not fit and records why; `timeout` is the last resort that keeps
# the whole command under 8 minutes if something hangs (the JSON is rewritten after every phase).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
limit=465
for arg in "$@"; do
  [ "$arg" = "--dry-run" ] && limit=960
done
exec timeout --signal=TERM --kill-after=15 "${RETINA_FAST_GPU_CHECK_LIMIT_S:-$limit}" \
  "${PYTHON:-python3}" benchmarks/gpu/gpu_check.py "$@"
