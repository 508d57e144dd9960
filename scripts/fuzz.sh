#!/usr/bin/env bash
# Fuzzes one parser with libFuzzer, ASan and UBSan (clang, in build-fuzz/):
#
#   scripts/fuzz.sh TARGET [SECONDS]    # default 60 s; TARGET one of the list below
#   scripts/fuzz.sh TARGET --merge      # add what the runs found that reaches new code to
#                                       # fuzz/corpus/TARGET (then review and commit it)
#
# Targets: address client_hello config control_request preamble snapshot (fuzz/fuzz_*.cc).
# Inputs the fuzzer finds go to build-fuzz/corpus/TARGET, never into the seed corpus
# fuzz/corpus/TARGET, which the normal test suite replays (ctest -L fuzz). A crash or a failed
# FUZZ_CHECK leaves its input in build-fuzz/artifacts/TARGET/; replay it with
# `build-fuzz/fuzz/fuzz_TARGET FILE`, shrink it with `-minimize_crash=1 -runs=10000 FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(address client_hello config control_request preamble scheduler snapshot)
target="${1:-}"
arg="${2:-60}"
case " ${targets[*]} " in
  *" ${target:-none} "*) ;;
  *)
    echo "usage: $0 TARGET [SECONDS|--merge]; TARGET: ${targets[*]}" >&2
    exit 2
    ;;
esac
scripts/deps.sh --fuzz
if [ ! -f build-fuzz/CMakeCache.txt ]; then
  CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DBROKERPROXY_FUZZ=ON -DBROKERPROXY_ASAN=ON -DBROKERPROXY_UBSAN=ON \
    -DBROKERPROXY_BUILD_TESTS=OFF -DBROKERPROXY_BUILD_BENCHMARKS=OFF >/dev/null
fi
cmake --build build-fuzz --target "fuzz_$target"
seeds="fuzz/corpus/$target"
found="build-fuzz/corpus/$target"
mkdir -p "$found" "build-fuzz/artifacts/$target"
# A hello may take 16 KiB + 5 bytes; the other parsers' inputs are lines and small files.
max_len=4096
[ "$target" = client_hello ] && max_len=17000
[ "$target" = snapshot ] && max_len=8192
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ "$arg" = --merge ]; then
  # Only inputs that reach new edges (not merely new hit counts), smallest first.
  exec "build-fuzz/fuzz/fuzz_$target" -merge=1 -use_counters=0 -max_len="$max_len" "$seeds" "$found"
fi
exec "build-fuzz/fuzz/fuzz_$target" "$found" "$seeds" -max_total_time="$arg" \
  -max_len="$max_len" -print_final_stats=1 -artifact_prefix="build-fuzz/artifacts/$target/"
