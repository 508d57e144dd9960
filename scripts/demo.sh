#!/usr/bin/env bash
# Builds brokerproxy, starts the daemon with its built-in default configuration, and shows a
# job being registered, read back and reached through the proxy port. Run as root on a fresh
# Debian 12 machine (it installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBROKERPROXY_BUILD_TESTS=OFF \
  -DBROKERPROXY_BUILD_BENCHMARKS=OFF -DBROKERPROXY_ASAN=OFF -DBROKERPROXY_UBSAN=OFF >/dev/null
cmake --build build
bp=build/brokerproxy
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "brokerproxy run  (no config file: the built-in defaults)"
$bp run & pids+=($!)
for _ in $(seq 100); do $bp query >/dev/null 2>&1 && break; sleep 0.1; done

say "brokerproxy save ssh --job-id demo -- socat ...  (a job script starting an echo service)"
$bp save ssh --job-id demo -- socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork EXEC:cat &
pids+=($!)
for _ in $(seq 100); do $bp query | grep -q 'demo .* ready' && break; sleep 0.1; done

say "brokerproxy query"
$bp query
say "brokerproxy load demo"
$bp load demo
secret=$($bp load demo --format env | sed -n 's/^BROKER_SECRET=//p')
say "brokerproxy verify demo <secret>"
$bp verify demo "$secret"
say "echo ... | brokerproxy connect demo --stdio  (through the proxy port 127.0.0.1:7000)"
echo "hello from the laptop side, through the proxy, echoed by the job" | $bp connect demo --stdio | cat
say "brokerproxy stats"
$bp stats
say "stopping the job (its record goes with it) and the daemon"
kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true
$bp query
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
pids=()
say "cpack: the Debian package (unit, site config, manual pages; docs/service.md)"
(cd build && cpack -G DEB | tail -1)
echo
echo "Done. Run the daemon for real with: $bp run   (see README.md and config.ini.example)"
