#!/usr/bin/env bash
# Installs what is missing, builds with AddressSanitizer and UBSan, and runs the whole test
# suite (unit, loop and end-to-end tests with real sshd, curl, chromium) plus the benchmarks in
# quick mode. Any sanitizer report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test
cmake -S . -B build-test -G Ninja -DCMAKE_BUILD_TYPE=Debug -DBROKERPROXY_ASAN=ON \
  -DBROKERPROXY_UBSAN=ON >/dev/null
cmake --build build-test
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build-test -j2 --output-on-failure
