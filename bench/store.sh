#!/usr/bin/env bash
# The registry's store, file against redis (docs/redis.md): save latency through the control
# socket, and the proxy's handshake rate (which checks secrets against the in-memory view in
# both cases, so it should not differ).
#
#   bench/store.sh [BUILD_DIR]        BUILD_DIR defaults to build-rel (relative to the repo root)
#
# Builds nothing: BUILD_DIR must hold brokerproxy and bench/brokerproxy_loadgen; needs
# redis-server and python3. Writes bench/results/store.{json,md}. Knobs (environment):
#   SAVES=500         saves per store, one at a time (latency) ...
#   CONCURRENT=8      ... then SAVES more from this many clients at once (throughput)
#   RUN_S=2           seconds of the handshake run (concurrency 32)
#   FSYNC=everysec    Redis's appendfsync (always, everysec, no)
#   OUT=bench/results where the results go
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-build-rel}
[[ $BUILD == /* ]] || BUILD=$ROOT/$BUILD
BP=$BUILD/brokerproxy
LG=$BUILD/bench/brokerproxy_loadgen
OUT=${OUT:-$ROOT/bench/results}
SAVES=${SAVES:-500}
CONCURRENT=${CONCURRENT:-8}
RUN_S=${RUN_S:-2}
FSYNC=${FSYNC:-everysec}
for f in "$BP" "$LG"; do
  [[ -x $f ]] || { echo "store.sh: $f not found; build first (see bench/README.md)" >&2; exit 2; }
done
for tool in redis-server python3 jq; do
  command -v $tool >/dev/null || { echo "store.sh: '$tool' is required" >&2; exit 2; }
done

T=$(mktemp -d /tmp/bpstore.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT

# Waits (at most 20 s) for a command to succeed.
wait_for() {
  for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "store.sh: timed out waiting for: $*" >&2
  return 1
}

mkdir -p "$T/redis"
redis-server --port 0 --unixsocket "$T/redis.sock" --unixsocketperm 700 --dir "$T/redis" \
  --appendonly yes --appendfsync "$FSYNC" --save "" --daemonize no >"$T/redis.log" 2>&1 &
PIDS+=($!)
wait_for redis-cli -s "$T/redis.sock" ping
head -c 32 /dev/urandom >"$T/store.key"
chmod 600 "$T/store.key"

"$LG" serve --listen 127.0.0.1:0 >"$T/backend.json" 2>"$T/backend.err" &
PIDS+=($!)
wait_for test -s "$T/backend.json"
BACKEND_PORT=$(jq -r '.listen' "$T/backend.json" | sed 's/.*://')

# One control request per connection, as the CLI sends them; prints the latencies (ms).
cat >"$T/saves.py" <<'EOF'
import json, socket, sys, threading, time
sock_path, prefix, count, clients, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
lat, errors, lock = [], [], threading.Lock()
def run(worker):
    for n in range(worker, count, clients):
        req = {"op": "save", "job": "%s-%d" % (prefix, n), "type": "ssh", "host": "127.0.0.1", "port": int(port)}
        t0 = time.perf_counter()
        s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sock_path)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk: break
            buf += chunk
        s.close()
        ms = (time.perf_counter() - t0) * 1000
        with lock:
            (lat if b'"ok":true' in buf else errors).append(ms)
start = time.perf_counter()
threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
wall = time.perf_counter() - start
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0
print(json.dumps({"saves": len(lat), "errors": len(errors), "per_s": len(lat) / wall,
                  "p50_ms": pct(0.5), "p99_ms": pct(0.99)}))
EOF

results=()
for store in file redis; do
  d=$T/$store
  mkdir -p "$d"
  extra=""
  if [[ $store == redis ]]; then
    extra="store = redis
store_address = unix:$T/redis.sock
store_key_file = $T/store.key
store_prefix = bench"
  fi
  cat >"$d/config.ini" <<EOF
[broker]
state_dir = $d/state
control_socket = $d/control.sock
log_level = warn
[registry]
port_range = 20000-29999
max_jobs_per_user = 0
$extra
[proxy]
listen = 127.0.0.1:0
EOF
  "$BP" run -c "$d/config.ini" >"$d/daemon.log" 2>&1 &
  PIDS+=($!)
  wait_for test -S "$d/control.sock"
  wait_for "$BP" stats -c "$d/config.ini"
  proxy_port=$("$BP" stats --json -c "$d/config.ini" | jq -r '.stats.ssh_known_hosts[0]' |
    sed 's/^\[127.0.0.1\]:\([0-9]*\).*/\1/')
  serial=$(python3 "$T/saves.py" "$d/control.sock" one "$SAVES" 1 "$BACKEND_PORT")
  parallel=$(python3 "$T/saves.py" "$d/control.sock" many "$SAVES" "$CONCURRENT" "$BACKEND_PORT")
  secret=$("$BP" load one-0 --format env -c "$d/config.ini" | sed -n 's/^BROKER_SECRET=//p')
  echo "BROKER1 one-0 $secret" >"$T/preamble"
  hs=$("$LG" handshake --connect "127.0.0.1:$proxy_port" --preamble-file "$T/preamble" \
    --concurrency 32 --seconds "$RUN_S")
  results+=("$(jq -n --arg store "$store" --argjson serial "$serial" --argjson parallel "$parallel" \
    --argjson hs "$hs" '{store: $store, serial: $serial, parallel: $parallel, handshake: $hs}')")
done

mkdir -p "$OUT"
printf '%s\n' "${results[@]}" | jq -s --arg fsync "$FSYNC" --arg saves "$SAVES" \
  --arg concurrent "$CONCURRENT" \
  '{appendfsync: $fsync, saves: ($saves|tonumber), concurrent: ($concurrent|tonumber), runs: .}' \
  >"$OUT/store.json"
{
  echo "# Registry store: file vs redis"
  echo
  echo "$(nproc) cores, $(date -u +%Y-%m-%d); Redis appendfsync $FSYNC, on a Unix socket."
  echo "Saves: $SAVES one at a time, then $SAVES from $CONCURRENT clients at once, each a"
  echo "control connection. Handshakes: loadgen, concurrency 32, ${RUN_S} s."
  echo
  echo "| store | save p50 (ms) | save p99 (ms) | saves/s, $CONCURRENT clients | handshakes/s |"
  echo "|---|---|---|---|---|"
  jq -r '.runs[] | "| \(.store) | \(.serial.p50_ms*100|round/100) | \(.serial.p99_ms*100|round/100) | \(.parallel.per_s|round) | \(.handshake.conns_per_s|round) |"' \
    "$OUT/store.json"
} >"$OUT/store.md"
cat "$OUT/store.md"
