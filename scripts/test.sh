#!/usr/bin/env bash
# Runs every test of simpul, the way CI does:
#   1. a gcc build with -Werror: unit tests + integration tests;
#   2. an ASan+UBSan build with -Werror: unit tests + integration tests (leaks fail the run);
#   3. a clang build with -Werror: compile only (catches what gcc lets through);
#   4. the Debian packages: built, installed and checked (scripts/test-deb.sh; needs root/sudo).
# Prints one closing line "N passed, N failed" and exits non-zero when anything failed.
# Usage: scripts/test.sh [--quick]   (--quick: the sanitizer build only)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
bash scripts/install-deps.sh || exit 1

quick=0
[ "${1:-}" = "--quick" ] && quick=1

total_pass=0
total_fail=0
failed_suites=()

setup() { # dir, extra meson args...
  local dir=$1; shift
  if [ ! -f "$dir/build.ninja" ]; then
    meson setup "$dir" -Dwerror=true "$@" >"$dir.setup.log" 2>&1 || { cat "$dir.setup.log"; return 1; }
  fi
  ninja -C "$dir" >"$dir.ninja.log" 2>&1 || { tail -50 "$dir.ninja.log"; return 1; }
}

run_suite() { # dir, label
  local dir=$1 label=$2
  echo "=== $label: meson test ($dir)"
  meson test -C "$dir" --print-errorlogs --num-processes 2 --timeout-multiplier 3 \
    >"$dir.test.log" 2>&1
  local rc=$?
  grep -E "^ *[0-9]+/[0-9]+ " "$dir.test.log" | sed 's/^/  /'
  local ok fail
  ok=$(sed -n 's/^Ok: *\([0-9]*\).*/\1/p' "$dir.test.log" | tail -1)
  fail=$(sed -n 's/^Fail: *\([0-9]*\).*/\1/p' "$dir.test.log" | tail -1)
  local to
  to=$(sed -n 's/^Timeout: *\([0-9]*\).*/\1/p' "$dir.test.log" | tail -1)
  ok=${ok:-0}; fail=${fail:-0}; to=${to:-0}
  fail=$((fail + to))
  if [ $rc -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
  if [ "$fail" -ne 0 ]; then
    failed_suites+=("$label")
    echo "--- failures in $label (log: $dir.test.log, meson-logs in $dir/meson-logs):"
    sed -n '/^=* *[0-9]*\/[0-9]* .*FAIL/,/^=*$/p' "$dir.test.log" | tail -200
  fi
  total_pass=$((total_pass + ok))
  total_fail=$((total_fail + fail))
}

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

if [ $quick -eq 0 ]; then
  if setup build-ci-gcc --buildtype=debugoptimized; then
    run_suite build-ci-gcc "gcc -Werror"
  else
    failed_suites+=("gcc build"); total_fail=$((total_fail + 1))
  fi
fi
if setup build-ci-asan --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false; then
  run_suite build-ci-asan "ASan+UBSan"
else
  failed_suites+=("asan build"); total_fail=$((total_fail + 1))
fi
if [ $quick -eq 0 ]; then
  if CC=clang setup build-ci-clang --buildtype=debugoptimized; then
    echo "=== clang -Werror: build OK"
  else
    failed_suites+=("clang build"); total_fail=$((total_fail + 1))
  fi
fi

# The Debian packages: built (lintian clean), installed with dpkg -i, --check on the installed
# config as the service user, upgrade keeps conffile and store. Bounded: ~1 min on 2 cores.
if [ $quick -eq 0 ]; then
  if timeout 600 scripts/test-deb.sh; then
    total_pass=$((total_pass + 1))
  else
    failed_suites+=("debian package"); total_fail=$((total_fail + 1))
  fi
fi

# Format (style.md): every C file as clang-format (Debian 12's, 14) would write it.
if git ls-files '*.c' '*.h' | xargs clang-format --dry-run --Werror >format.log 2>&1; then
  echo "=== clang-format: OK"
else
  head -30 format.log
  failed_suites+=("clang-format"); total_fail=$((total_fail + 1))
fi

if [ ${#failed_suites[@]} -gt 0 ]; then
  echo "FAILED: ${failed_suites[*]}"
fi
echo "${total_pass} passed, ${total_fail} failed"
[ "$total_fail" -eq 0 ]
