#!/usr/bin/env bash
# The GPU check as one command on a GPU machine without internet (docs/gpu.md):
#
#   bash scripts/gpu_check.sh [gpu_check.py arguments...]
#
# 1. installs the wheels in .whl/ (made beforehand by scripts/gpu_wheels.py on a machine with the
#    registry) offline into /tmp/site, leaving the machine's own packages as they are;
# 2. runs scripts/gpu_check.py with this checkout on PYTHONPATH;
# 3. leaves in $OUT (or ./gpu_check_out): console.log, results.json, results.md and logs.tar.gz (one log
#    per run) - four files, so that a tool returning a few files brings everything back.
# Exit status: gpu_check.py's (non-zero when a run failed or a check did not hold), 2 when the install failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-$PWD/gpu_check_out}
WORK=/tmp/gpu_check
mkdir -p "$RESULTS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed" | tee "$RESULTS/console.log"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ folder: DeepSpeed and jsonargparse must already be installed (scripts/gpu_wheels.py makes it)"
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } 2>&1 | tee "$RESULTS/console.log"
python3 scripts/gpu_check.py --out "$WORK" "$@" 2>&1 | tee -a "$RESULTS/console.log"
status=${PIPESTATUS[0]}
cp "$WORK/results.json" "$WORK/results.md" "$RESULTS/" 2>/dev/null
tar czf "$RESULTS/logs.tar.gz" -C "$WORK" logs 2>/dev/null
exit "$status"
