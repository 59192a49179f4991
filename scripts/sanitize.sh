#!/usr/bin/env bash
# The CPU tests under AddressSanitizer + UndefinedBehaviorSanitizer:
#   bash scripts/sanitize.sh [extra pytest args]        (or: make test-sanitize)
# 1. copies the tree (the files git tracks or would track) to $SAN_DIR/src and builds the CPU
#    extension there with PYFASTDL_SANITIZE=1 (-fsanitize=address,undefined, no CUDA), so the normal
#    in-place build is untouched; reruns are incremental (objects in $SAN_DIR/build);
# 2. checks the net: the built pyfastdl._C carries ASan and UBSan checks, and a heap overflow made
#    on purpose under the preloaded runtime is reported and fails;
# 3. runs the CPU tests (not the Triton-interpreter ones, not CUDA) with the runtime preloaded;
#    tests/test_train.py (whole training runs of the same kernels, through torchrun) is left out:
#    too slow under ASan for what it adds.
# Zero reports or it fails: ASan and UBSan (halt_on_error=1) stop the process at the first one, and
# the report files are checked after the run, so a report inside a subprocess also fails.
# Environment: PY (default .venv/bin/python), SAN_DIR (default build/sanitize), CC (default gcc; the
# compiler whose runtime is preloaded must be the one that built the extension),
# SANITIZE_TESTS (pytest -m expression), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
SAN_DIR=${SAN_DIR:-$ROOT/build/sanitize}
CC=${CC:-gcc}
MARKS=${SANITIZE_TESTS:-not triton and not cuda}
t0=$SECONDS
say() { echo "sanitize: $* ($((SECONDS - t0)) s)"; }

# ---- 1. the copy and the build -------------------------------------------------------------------
mkdir -p "$SAN_DIR"
SAN_DIR=$(cd "$SAN_DIR" && pwd)
rm -rf "$SAN_DIR/src" "$SAN_DIR/reports"
mkdir -p "$SAN_DIR/src" "$SAN_DIR/reports"
"$PY" - "$ROOT" "$SAN_DIR/src" <<'EOF'
import os, shutil, subprocess, sys
src, dst = sys.argv[1:3]
out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                     cwd=src, capture_output=True, check=True).stdout.decode()
for f in filter(None, out.split("\0")):
    if os.path.isfile(os.path.join(src, f)) and not f.startswith("build/"):
        os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))  # keeps mtimes: incremental rebuilds
# pyfastdl.triton_kernels is mapped from triton_kernels/ by setup.py; the copy is not installed
os.symlink(os.path.join("..", "triton_kernels"), os.path.join(dst, "pyfastdl", "triton_kernels"))
EOF
say "copied the tree to $SAN_DIR/src"
(cd "$SAN_DIR/src" && PYFASTDL_SANITIZE=1 PYFASTDL_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
   "$PY" setup.py -q build_ext --inplace --build-temp "$SAN_DIR/build" >"$SAN_DIR/build.log" 2>&1) || {
  tail -50 "$SAN_DIR/build.log"; echo "sanitize: the sanitized build FAILED (log: $SAN_DIR/build.log)" >&2; exit 1; }
say "built pyfastdl._C with -fsanitize=address,undefined"

so=$(ls "$SAN_DIR"/src/pyfastdl/_C*.so)
symbols=$(nm -D "$so")  # (not piped into grep -q: with pipefail, nm's SIGPIPE would read as a miss)
for sym in __asan_report_load __ubsan_handle_; do
  if ! grep -q "$sym" <<<"$symbols"; then
    echo "sanitize: $so has no $sym* calls: not a sanitized build" >&2; exit 1
  fi
done

# ---- 2. the runtime, and a check that it reports -------------------------------------------------
asan=$(readlink -f "$("$CC" -print-file-name=libasan.so)")
ubsan=$(readlink -f "$("$CC" -print-file-name=libubsan.so)")
[ -f "$asan" ] && [ -f "$ubsan" ] || { echo "sanitize: $CC has no libasan/libubsan ($asan, $ubsan)" >&2; exit 1; }
export LD_PRELOAD="$asan $ubsan"
# detect_leaks=0: CPython and torch keep allocations until exit by design.
# allocator_may_return_null=1: an impossible allocation raises in torch, as without ASan.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:log_path=$SAN_DIR/reports/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$SAN_DIR/reports/ubsan"
if "$PY" -c "
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.memset(libc.malloc(16), 0, 32)  # 16 bytes past the end
" 2>/dev/null || ! ls "$SAN_DIR"/reports/asan.* >/dev/null 2>&1; then
  echo "sanitize: a heap overflow made on purpose was not reported: the runtime is not active" >&2; exit 1
fi
grep -q "heap-buffer-overflow" "$SAN_DIR"/reports/asan.* || { echo "sanitize: unexpected self-check report" >&2; exit 1; }
rm -f "$SAN_DIR"/reports/*
say "the preloaded runtime reports (self-check: a heap overflow made on purpose was caught)"

# ---- 3. the CPU tests ----------------------------------------------------------------------------
status=0
(cd "$SAN_DIR/src" && unset PYFASTDL_REQUIRE_CUDA_BUILD && PYFASTDL_STRICT=1 "$PY" -m pytest tests -q -p no:cacheprovider -m "$MARKS" \
  --ignore=tests/test_train.py "$@") || status=$?
if ls "$SAN_DIR"/reports/* >/dev/null 2>&1; then
  for f in "$SAN_DIR"/reports/*; do echo "=== $f"; cat "$f"; done
  echo "sanitize: FAILED: sanitizer reports above" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize: FAILED: the tests failed under the sanitizers (pytest status $status)" >&2
  exit "$status"
fi
say "ok: the CPU tests ($MARKS) passed under ASan+UBSan with no report"
