#!/usr/bin/env bash
# The GPU check in one command, sized for a GPU loan (about 15 minutes of device time, machine start
# included, at most 10 minutes a command): under 8 minutes on an H200 with 16 cores, build included.
#   bash scripts/gpu_check.sh OUT_DIR        (or: make gpu-check OUT=OUT_DIR)
# On a machine with an NVIDIA GPU, its own torch and no network. Stages, each under `timeout` with
# the budget below (seconds), in this order -- the verdicts that matter most come first:
#   env          nvidia-smi, versions
#   build        pyfastdl._C for this GPU's arch only, MAX_JOBS = all cores
#   build-tests  tests/test_build.py (every op has a CUDA kernel, the CUDA sources were built)
#   cuda-tests   the CUDA tests   (-m cuda),   pytest-xdist -n $GPU_CHECK_WORKERS when installed
#   triton-tests the Triton tests (-m triton), same
#   sanitizer    compute-sanitizer memcheck on a short subset of the CUDA tests (where installed)
#   bench        the GPU benchmark report (quick, no torch.compile), one report per family
# OUT_DIR/summary.md is rewritten before and after every stage (stage, budget, elapsed, status), so a
# run cut short still leaves what it got, and which stage it was in; each stage's output is in
# OUT_DIR/<stage>.log as it runs. A stage past its budget gets SIGINT (pytest then prints what ran
# and writes its junit XML), SIGKILL 15 s later. Exit status: 0 when every stage passed.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's arch),
# GPU_CHECK_WORKERS (default 8), GPU_CHECK_SCALE (multiplies every budget, default 1).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG="$OUT/gpu-check.log"
SUMMARY="$OUT/summary.md"
: > "$LOG"

# Budgets (s). Measured/estimated for an H200 host with 16 cores (see the issue's report):
# total 460 s = 7.7 min, the build (one arch) included.
# 2026-12-01: conv2d.cu and rnn.cu added (sm_90 alone: 1.3-4 min each on 2 busy cores here, the build
# runs them side by side on 16), and their CUDA and Triton tests; total 460 s (8 min less 15 s of slack, tests/test_build.py).
declare -A BUDGET=([env]=10 [build]=165 [build-tests]=25 [cuda-tests]=90 [triton-tests]=100
                   [sanitizer]=35 [bench]=35)
STAGES=(env build build-tests cuda-tests triton-tests sanitizer bench)
SCALE=${GPU_CHECK_SCALE:-1}
for s in "${STAGES[@]}"; do BUDGET[$s]=$("$PY" -c "print(max(1, round(${BUDGET[$s]} * $SCALE)))" 2>/dev/null || echo "${BUDGET[$s]}"); done
total_budget=0
for s in "${STAGES[@]}"; do total_budget=$((total_budget + BUDGET[$s])); done

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  echo "gpu-check: no NVIDIA GPU is visible to torch ($PY); this check needs one (nothing was run)" | tee -a "$LOG" >&2
  exit 2
fi

T0=$SECONDS
declare -A STATE ELAPSED
for s in "${STAGES[@]}"; do STATE[$s]="not reached"; ELAPSED[$s]=""; done
write_summary() {  # rewritten whole, then renamed: a reader never sees half a file
  {
    echo "# gpu-check summary"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname); elapsed $((SECONDS - T0)) s of the $total_budget s budgeted"
    echo
    echo "| stage | budget (s) | elapsed (s) | status |"
    echo "| --- | --- | --- | --- |"
    for s in "${STAGES[@]}"; do echo "| $s | ${BUDGET[$s]} | ${ELAPSED[$s]} | ${STATE[$s]} |"; done
  } > "$SUMMARY.tmp" && mv -f "$SUMMARY.tmp" "$SUMMARY"
}

status=0
stage() {  # stage NAME COMMAND...: runs under NAME's budget, output to OUT/NAME.log
  local name=$1; shift
  local budget=${BUDGET[$name]} t0=$SECONDS rc
  STATE[$name]="running"
  write_summary
  echo "gpu-check: $name: budget $budget s, started at $((SECONDS - T0)) s" | tee -a "$LOG"
  echo "=== $name: $*" > "$OUT/$name.log"
  timeout --signal=INT --kill-after=15 "$budget" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  ELAPSED[$name]=$((SECONDS - t0))
  case $rc in
    0) STATE[$name]="ok" ;;
    124|137) STATE[$name]="TIMEOUT (budget $budget s)"; status=1 ;;
    *) STATE[$name]="FAILED (exit $rc)"; status=1 ;;
  esac
  echo "gpu-check: $name: ${STATE[$name]} in ${ELAPSED[$name]} s (total $((SECONDS - T0)) s)" | tee -a "$LOG"
  write_summary
  return $rc
}
skip() {  # skip NAME WHY
  STATE[$1]="skipped: $2"
  ELAPSED[$1]=0
  echo "gpu-check: $1: skipped: $2" | tee -a "$LOG"
  write_summary
}
write_summary

arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export PYFASTDL_CUDA=1 PYFASTDL_REQUIRE_CUDA_BUILD=1 PYFASTDL_STRICT=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "gpu-check: arch $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, budget $total_budget s in all" | tee -a "$LOG"

stage env bash -c "nvidia-smi; nvcc --version; nproc; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'"

# a fresh pyfastdl._C against this machine's torch (pip builds in a temporary folder)
if stage build bash -c "rm -f pyfastdl/_C*.so && \"\$0\" -m pip install --no-build-isolation --no-deps --no-index -v -e ." "$PY"; then
  "$PY" -m pyfastdl info >>"$OUT/build.log" 2>&1

  workers=()
  if "$PY" -c "import xdist" >/dev/null 2>&1; then workers=(-n "${GPU_CHECK_WORKERS:-8}"); fi
  pytest=("$PY" -m pytest -q -rfEs -p no:cacheprovider --durations=10)
  stage build-tests "${pytest[@]}" tests/test_build.py --junitxml="$OUT/build-tests.xml"
  stage cuda-tests "${pytest[@]}" "${workers[@]}" tests -m cuda --junitxml="$OUT/cuda-tests.xml"
  stage triton-tests "${pytest[@]}" "${workers[@]}" tests -m triton --junitxml="$OUT/triton-tests.xml"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    # one small case per CUDA family, forward and backward (memcheck runs kernels ~10-100x slower)
    stage sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
      "$PY" -m pytest -q -x -p no:cacheprovider -m cuda \
        tests/test_batch_norm.py tests/test_attention.py tests/test_optim.py tests/test_conv2d.py tests/test_rnn.py \
        tests/test_pool2d.py \
        -k "(float32 and (affine-train or causal or Adam)) or (conv2d and output_mask_honoured) or (packed_uneven_lengths and seq_first-unsorted) or (cells_match_torch and 4-5-6) or (cuda_max_pool2d and random-2-cuda-float32) or (cuda_avg_pool2d and 3-cuda-float16)"
  else
    skip sanitizer "compute-sanitizer not installed"
  fi
  # one report per family, so a bench cut short keeps the families it finished; the kernel families
  # first, the whole-model steps (models) last
  stage bench bash -c 'for f in $("$0" -c "from pyfastdl.bench import core; print(*sorted(core.families(), key=lambda f: f == \"models\"))"); do
      "$0" -m pyfastdl bench --quick --no-compile --device cuda --families "$f" --out "$1/bench-$f" || exit 1
    done' "$PY" "$OUT"
else
  for s in build-tests cuda-tests triton-tests sanitizer bench; do skip "$s" "the build failed"; done
fi
echo "gpu-check: done in $((SECONDS - T0)) s, status $status; summary $SUMMARY, logs in $OUT" | tee -a "$LOG"
exit $status
