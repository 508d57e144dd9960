#!/usr/bin/env bash
# What a new connection costs on the laptop side: `brokerproxy connect` in each of its modes,
# next to a direct connection, the raw proxy port and a stock `ssh -L`, all on 127.0.0.1.
#
#   bench/connect.sh [BUILD_DIR]     BUILD_DIR defaults to build-rel (relative to the repo root)
#
# Every path ends at the same loadgen echo backend; each new connection is: connect to the
# path's local port, write one byte, read it back, close (loadgen `handshake`, concurrency 1,
# so each figure is the latency of one new connection, not a rate under load). The paths:
#   direct        the backend itself
#   proxy         the proxy port with the plain preamble (what `connect` speaks)
#   connect       `brokerproxy connect JOB --listen`, secret from the local daemon
#   connect-tls   the same with --tls: TLS to the proxy, which terminates it
#   connect-via   `connect --via root@127.0.0.1:SSHD`: one SSH session to a real sshd standing for
#                 the login node; each connection is a direct-tcpip channel to the proxy port
#   ssh-L         stock `ssh -L` through the same sshd, straight to the backend (what a user
#                 would otherwise pick; needs no broker at all)
# On loopback a round trip costs tens of microseconds, so `connect-via` minus `connect` is what
# the SSH channel adds beyond the login-node round trip it needs.
#
# (`connect --via --tls` is not here: it dials the login host's proxy port directly, which a proxy
# listening on loopback only, as here, refuses to let it do; its tunnels then cost what
# connect-tls's do.) Needs root (sshd) and openssh-server for the via and ssh-L paths; skips them
# otherwise. Writes bench/results/connect.{json,md}.
# Knobs: REPS=5 (interleaved, order rotated), RUN_S=2 (seconds per run), OUT=bench/results,
# KEEP_TMP=1 keeps the temporary directory (logs of every process).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-build-rel}
[[ $BUILD == /* ]] || BUILD=$ROOT/$BUILD
BP=$BUILD/brokerproxy
LG=$BUILD/bench/brokerproxy_loadgen
OUT=${OUT:-$ROOT/bench/results}
REPS=${REPS:-5}
RUN_S=${RUN_S:-2}
for f in "$BP" "$LG"; do
  [[ -x $f ]] || { echo "connect.sh: $f not found; build first (see bench/README.md)" >&2; exit 2; }
done
command -v jq >/dev/null || { echo "connect.sh: jq is required" >&2; exit 2; }

T=$(mktemp -d /tmp/bpconnect.XXXXXX)
PIDS=()
SECONDS=0
log() { printf '[connect %3ds] %s\n' "$SECONDS" "$*" >&2; }
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "kept $T" >&2; else rm -rf "$T"; fi
  exit $rc
}
trap cleanup EXIT INT TERM

start_bg() {  # NAME CMD...: logs to $T/NAME.log, sets BG_PID
  local name=$1
  shift
  "$@" >"$T/$name.log" 2>&1 &
  BG_PID=$!
  PIDS+=("$BG_PID")
}

# The port a process of ours listens on, read back from the kernel (every listener here binds
# port 0, so nothing is guessed): the first listening TCP socket owned by PID.
listen_port() {  # PID [TIMEOUT_S]
  local deadline=$((SECONDS + ${2:-15})) p
  while ((SECONDS < deadline)); do
    kill -0 "$1" 2>/dev/null || return 1
    p=$(ss -Htlnp 2>/dev/null | awk -v pid="pid=$1," '$0 ~ pid { sub(/.*:/, "", $4); print $4; exit }')
    [[ -n $p ]] && { echo "$p"; return 0; }
    sleep 0.05
  done
  return 1
}

# A port nobody uses now, for the two programs that cannot bind port 0 (sshd, ssh -L).
free_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 12000))
    [[ -z $(ss -Htan "( sport = :$p )") ]] && { echo "$p"; return 0; }
  done
  return 1
}

declare -A PORT PREAMBLE
PATHS=()
add_path() {  # NAME PID [PREAMBLE_FILE]
  local p
  if p=$(listen_port "$2"); then
    PORT[$1]=$p PREAMBLE[$1]=${3:-}
    PATHS+=("$1")
    log "$1 on 127.0.0.1:$p"
  else
    log "$1 skipped: it did not listen (see below)"
    tail -3 "$T/$1.log" >&2 || true
  fi
}

start_bg backend "$LG" echo --listen 127.0.0.1:0
BPORT=$(listen_port "$BG_PID")
PORT[direct]=$BPORT PREAMBLE[direct]=""
PATHS+=(direct)

mkdir -p "$T/state"
cat >"$T/config.ini" <<EOF
[broker]
state_dir = $T/state
log_level = warn
[proxy]
listen = 127.0.0.1:0
EOF
ln -sf "$BP" "$T/bp-connect-daemon"  # a name of its own: a `killall brokerproxy` misses it
start_bg daemon "$T/bp-connect-daemon" run -c "$T/config.ini"
DPID=$BG_PID
PPORT=$(listen_port "$DPID")
export BROKERPROXY_CONFIG=$T/config.ini
"$BP" save ssh --job-id bench --host 127.0.0.1 --port "$BPORT" --json >"$T/save.json"
secret=$(jq -r '.job.secret' "$T/save.json")
(umask 077 && printf 'BROKER1 bench %s\n' "$secret" >"$T/preamble")
PORT[proxy]=$PPORT PREAMBLE[proxy]=$T/preamble
PATHS+=(proxy)
log "daemon on 127.0.0.1:$PPORT, job 'bench' -> 127.0.0.1:$BPORT"

start_bg connect "$BP" connect bench --listen 127.0.0.1:0 --proxy "127.0.0.1:$PPORT"
add_path connect "$BG_PID"
start_bg connect-tls "$BP" connect bench --listen 127.0.0.1:0 --proxy "127.0.0.1:$PPORT" --tls
add_path connect-tls "$BG_PID"

if [[ $EUID -eq 0 && -x /usr/sbin/sshd ]] && command -v ssh >/dev/null; then
  mkdir -p "$T/home/.ssh" /run/sshd
  chmod 700 "$T/home" "$T/home/.ssh"
  ssh-keygen -q -t ed25519 -N '' -f "$T/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$T/home/.ssh/id_ed25519"
  cp "$T/home/.ssh/id_ed25519.pub" "$T/authorized_keys"
  cat >"$T/sshd_config" <<EOF
ListenAddress 127.0.0.1
HostKey $T/host_key
PidFile none
AuthorizedKeysFile $T/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
UseDNS no
LogLevel ERROR
EOF
  # sshd cannot bind port 0: a port that looks free is tried, and another if sshd loses it.
  SSH_PORT=""
  for _ in 1 2 3 4 5; do
    p=$(free_port)
    start_bg sshd /usr/sbin/sshd -D -e -f "$T/sshd_config" -o "Port=$p"
    if listen_port "$BG_PID" >/dev/null; then SSH_PORT=$p; break; fi
  done
  if [[ -n $SSH_PORT ]]; then
    printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" "$(cut -d' ' -f1-2 "$T/host_key.pub")" >"$T/home/.ssh/known_hosts"
    # The "laptop": its own HOME (key, known_hosts), no config; the login node's side of each
    # call finds the daemon through remote_command.
    printf '[client]\nremote_command = env BROKERPROXY_CONFIG=%s %s\n' "$T/config.ini" "$BP" >"$T/laptop.ini"
    via=(--via "root@127.0.0.1:$SSH_PORT" -c "$T/laptop.ini")
    HOME=$T/home SSH_AUTH_SOCK='' start_bg connect-via "$BP" connect bench --listen 127.0.0.1:0 "${via[@]}"
    add_path connect-via "$BG_PID"
    # ssh -L cannot bind port 0 either.
    p=$(free_port)
    start_bg ssh-L ssh -F /dev/null -N -p "$SSH_PORT" -i "$T/home/.ssh/id_ed25519" \
      -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      -o ExitOnForwardFailure=yes -o LogLevel=ERROR -L "127.0.0.1:$p:127.0.0.1:$BPORT" root@127.0.0.1
    add_path ssh-L "$BG_PID"
  else
    log "sshd did not start: the via and ssh-L paths are skipped"
  fi
else
  log "not root or no sshd: the via and ssh-L paths are skipped"
fi

RAW=$T/raw.jsonl
: >"$RAW"
for ((rep = 1; rep <= REPS; rep++)); do
  n=${#PATHS[@]}
  for ((i = 0; i < n; i++)); do
    path=${PATHS[(i + rep) % n]}
    args=(--connect "127.0.0.1:${PORT[$path]}" --concurrency 1 --seconds "$RUN_S")
    [[ -n ${PREAMBLE[$path]} ]] && args+=(--preamble-file "${PREAMBLE[$path]}")
    out=$("$LG" handshake "${args[@]}" 2>>"$T/loadgen.err") || out='{"ok":false}'
    jq -c --arg path "$path" --argjson rep "$rep" '. + {path: $path, rep: $rep}' <<<"$out" >>"$RAW"
    [[ $(jq -r .ok <<<"$out") == true ]] || log "  FAILED: $path: $(jq -c .errors <<<"$out")"
  done
  log "rep $rep of $REPS done"
done

mkdir -p "$OUT"
jq -s --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg nproc "$(nproc)" \
  --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)" --argjson reps "$REPS" '
  def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  {facts: {date: $date, nproc: ($nproc | tonumber), commit: $commit, reps: $reps},
   runs: .,
   summary: (group_by(.path) | map({path: .[0].path,
     ok: all(.[]; .ok == true),
     p50_us: (map(select(.ok) | .latency_us.p50) | median),
     p90_us: (map(select(.ok) | .latency_us.p90) | median),
     p99_us: (map(select(.ok) | .latency_us.p99) | median),
     conns_per_s: (map(select(.ok) | .conns_per_s) | median)}))}' "$RAW" >"$OUT/connect.json"
{
  echo "# New-connection latency through each laptop-side path"
  echo
  echo "Loopback, $(nproc) cores, commit $(jq -r .facts.commit "$OUT/connect.json"), $(date -u +%F)."
  echo "Median of $REPS interleaved runs of ${RUN_S}s; each connection is connect, 1-byte echo,"
  echo "close, one at a time (bench/connect.sh)."
  echo
  echo "| path | p50 µs | p90 µs | p99 µs | connections/s |"
  echo "|---|---:|---:|---:|---:|"
  for path in direct proxy connect connect-tls connect-via ssh-L; do
    jq -r --arg p "$path" '.summary[] | select(.path == $p) |
      "| \(.path)\(if .ok then "" else " (some runs failed)" end) | \(.p50_us) | \(.p90_us) | \(.p99_us) | \(.conns_per_s) |"' \
      "$OUT/connect.json"
  done
} >"$OUT/connect.md"
log "done in ${SECONDS}s"
cat "$OUT/connect.md"
