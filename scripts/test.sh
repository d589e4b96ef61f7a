#!/usr/bin/env bash
# Runs every test of simpul, the way CI does:
#   1. a gcc build with -Werror: unit tests + integration tests;
#   2. an ASan+UBSan build with -Werror: unit tests + integration tests (leaks fail the run);
#   3. a clang build with -Werror: compile only (catches what gcc lets through);
#   4. every libFuzzer harness for 5 s (clang builds only).
#   5. the Debian packages: built, installed and checked (scripts/test-deb.sh; needs root/sudo).
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

# Fuzz harnesses (tests/fuzz): each runs for a few seconds from its corpus, when clang with
# libFuzzer is here (it is on CI). New inputs go to a temporary folder, never into the repo;
# the long runs are recorded in docs/fuzzing.md.
if [ $quick -eq 0 ] && command -v clang >/dev/null &&
   echo 'int LLVMFuzzerTestOneInput(const char *d, long n){return 0;}' |
     clang -x c -fsanitize=fuzzer -o /dev/null - >/dev/null 2>&1; then
  if CC=clang setup build-ci-fuzz --buildtype=debugoptimized -Dfuzz=true \
       -Db_sanitize=address,undefined -Db_lundef=false; then
    fuzz_fail=0
    for src in tests/fuzz/fuzz_*.c; do
      h=$(basename "$src" .c)
      tmp=$(mktemp -d)
      mkdir -p "tests/fuzz/corpus/$h"
      seeds=("tests/fuzz/corpus/$h")
      [ "$h" = fuzz_config ] && seeds+=(tests/integration/configs)
      if SMP_FUZZ_PLUGIN_DIR="$ROOT/build-ci-fuzz/protocols/modbus" \
           "build-ci-fuzz/tests/fuzz/$h" -max_total_time=5 -timeout=10 "$tmp" "${seeds[@]}" \
           >"build-ci-fuzz.$h.log" 2>&1; then
        echo "=== fuzz $h: OK ($(grep -o 'Done [0-9]* runs' "build-ci-fuzz.$h.log"))"
      else
        echo "--- fuzz $h FAILED (log: build-ci-fuzz.$h.log):"; tail -30 "build-ci-fuzz.$h.log"
        fuzz_fail=1
      fi
      rm -rf "$tmp"
    done
    if [ $fuzz_fail -ne 0 ]; then
      failed_suites+=("fuzz"); total_fail=$((total_fail + 1))
    fi
  else
    failed_suites+=("fuzz build"); total_fail=$((total_fail + 1))
  fi
else
  echo "=== fuzz: skipped (no clang with libFuzzer, or --quick)"
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
