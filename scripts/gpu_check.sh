#!/usr/bin/env bash
# The GPU check in one command, for a machine with an NVIDIA GPU, its own torch and no network:
#   bash scripts/gpu_check.sh OUT_DIR        (or: make gpu-check OUT=OUT_DIR)
# 1. rebuilds pyfastdl._C (CPU + CUDA) against that machine's torch, 2. runs the whole test suite
# strict -- every CUDA and Triton test runs on the GPU --, 3. runs the CUDA tests under
# compute-sanitizer where it is installed, 4. runs the GPU benchmark report. Everything (logs,
# report) lands in OUT_DIR; the exit status is non-zero if any step failed.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's arch).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG="$OUT/gpu-check.log"
: > "$LOG"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  echo "gpu-check: no NVIDIA GPU is visible to torch ($PY); this check needs one (nothing was run)" | tee -a "$LOG" >&2
  exit 2
fi

status=0
step() {  # step NAME COMMAND...: runs, appends its output to the log, records failure
  local name=$1; shift
  echo "=== $name: $*" >>"$LOG"
  local t0=$SECONDS
  if "$@" >>"$LOG" 2>&1; then
    echo "gpu-check: $name ok ($((SECONDS - t0)) s)" | tee -a "$LOG"
  else
    echo "gpu-check: $name FAILED ($((SECONDS - t0)) s) -- see $LOG" | tee -a "$LOG"
    status=1
  fi
}

arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export PYFASTDL_CUDA=1 PYFASTDL_REQUIRE_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
step env bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'"
rm -rf build pyfastdl/_C*.so
step build "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
step info "$PY" -m pyfastdl info
step tests env PYFASTDL_STRICT=1 "$PY" -m pytest tests -q -rs -p no:cacheprovider
if command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 \
    env PYFASTDL_STRICT=1 "$PY" -m pytest tests -q -x -m cuda -p no:cacheprovider
else
  echo "gpu-check: compute-sanitizer not installed, skipped" | tee -a "$LOG"
fi
step bench "$PY" -m pyfastdl bench --device cuda --out "$OUT"
echo "gpu-check: done, status $status; report and logs in $OUT" | tee -a "$LOG"
exit $status
