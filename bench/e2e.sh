#!/usr/bin/env bash
# End-to-end benchmark of the brokerproxy daemon against a direct connection and its peers
# (socat, HAProxy in TCP mode with and without splicing, OpenSSH `ssh -L`), and of its SSH
# endpoint and TLS termination against sshd and HAProxy's TLS termination, all on 127.0.0.1.
#
#   bench/e2e.sh [BUILD_DIR]        BUILD_DIR defaults to build-rel (relative to the repo root)
#
# Builds nothing: BUILD_DIR must hold brokerproxy and bench/brokerproxy_loadgen. Writes
# bench/results/e2e.{json,md}, e2e-raw.jsonl and e2e-*.png (see bench/README.md for what each
# number means). Knobs, as environment variables:
#   REPS=3            repetitions of every measurement (peers interleaved, order rotated)
#   RUN_S=2           seconds per throughput/handshake run
#   ENC_RUN_S=1       the same for the encrypted peers (SSH, TLS): slower per byte, so their
#                     runs are shorter to keep the whole benchmark under 10 minutes
#   TRANSFER=64M      bytes per throughput transfer
#   PEERS="..."       subset of: brokerproxy direct socat haproxy haproxy-splice ssh-aes ssh-chacha
#                     brokerproxy-ssh-aes brokerproxy-ssh-chacha brokerproxy-tls haproxy-tls
#   IDLE_COUNTS="1000 8000"   idle sessions held for the memory measurement
#   MEM_PEERS="brokerproxy haproxy haproxy-splice socat ssh-aes brokerproxy-ssh-aes brokerproxy-tls haproxy-tls"
#                     peers whose memory is measured, with idle sessions and under slow readers
#                     (socat and ssh only at the smallest count: a process or a channel per
#                     session, and an SSH session takes at most 1,024 channels); MEM_PEERS=""
#                     measures none
#   SLOW_STREAMS=8    slow readers (64 KiB every 10 ms each) for the slow-reader memory run
#   PROFILE=0         1: also record `perf` of the daemon during a concurrency-32 handshake run
#   OUT=bench/results where the results go
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-build-rel}
[[ $BUILD == /* ]] || BUILD=$ROOT/$BUILD
BP=$BUILD/brokerproxy
LG=$BUILD/bench/brokerproxy_loadgen
OUT=${OUT:-$ROOT/bench/results}
REPS=${REPS:-3}
RUN_S=${RUN_S:-2}
ENC_RUN_S=${ENC_RUN_S:-1}
TRANSFER=${TRANSFER:-64M}
PEERS=${PEERS:-"brokerproxy direct socat haproxy haproxy-splice ssh-aes ssh-chacha brokerproxy-ssh-aes brokerproxy-ssh-chacha brokerproxy-tls haproxy-tls"}
IDLE_COUNTS=${IDLE_COUNTS:-"1000 8000"}
MEM_PEERS=${MEM_PEERS-"brokerproxy haproxy haproxy-splice socat ssh-aes brokerproxy-ssh-aes brokerproxy-tls haproxy-tls"}
SLOW_STREAMS=${SLOW_STREAMS:-8}
PROFILE=${PROFILE:-0}

for f in "$BP" "$LG"; do
  [[ -x $f ]] || { echo "e2e.sh: $f not found; build first (see bench/README.md)" >&2; exit 2; }
done
for tool in jq ss; do
  command -v $tool >/dev/null || { echo "e2e.sh: '$tool' is required (apt-get install jq iproute2)" >&2; exit 2; }
done

T=$(mktemp -d /tmp/bpbench.XXXXXX)
PIDS=()
SECONDS=0
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)

log() { printf '[e2e %3ds] %s\n' "$SECONDS" "$*" >&2; }

# True if PID is still a child of this script (a PID of a child that has exited may have been
# reused by someone else's process, which must not be signalled).
ours() {
  [[ -r /proc/$1/stat ]] && [[ $(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $2 }') == "$$" ]]
}

# Every child is stopped by its PID (and, for forking peers, its children by parent PID).
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local i p
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    p=${PIDS[i]}
    if ours "$p"; then
      pkill -TERM -P "$p" 2>/dev/null || true
      kill -TERM "$p" 2>/dev/null || true
    fi
  done
  for p in "${PIDS[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do ours "$p" || break; sleep 0.2; done
    if ours "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  wait 2>/dev/null || true
  if [[ ${KEEP_TMP:-0} == 1 ]]; then log "temporary files kept in $T"; else rm -rf "$T"; fi
  exit $rc
}
trap cleanup EXIT INT TERM

# Raise the open-file limit to the hard limit: 8,000 idle sessions need 16,000 fds in a proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- helpers ----

USED_PORTS=" "
free_port() {
  local p
  for _ in $(seq 500); do
    p=$((20000 + RANDOM % 12000))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if [[ -z $(ss -Htan "( sport = :$p )" 2>/dev/null) ]]; then
      USED_PORTS+="$p "
      echo "$p"
      return 0
    fi
  done
  echo "e2e.sh: no free port found" >&2
  return 1
}

wait_listen() {  # PORT [TIMEOUT_S]
  local deadline=$((SECONDS + ${2:-10}))
  while [[ -z $(ss -Htln "( sport = :$1 )" 2>/dev/null) ]]; do
    ((SECONDS < deadline)) || { echo "e2e.sh: nothing listens on port $1 after ${2:-10}s" >&2; return 1; }
    sleep 0.05
  done
}

# The given PIDs and all their descendants, one per line (one `ps` call, however many
# processes: socat forks one per session).
descendants() {
  ps -e -o pid=,ppid= | awk -v roots="$*" '
    { kids[$2] = kids[$2] " " $1 }
    END {
      n = split(roots, queue, " ")
      for (i = 1; i <= n; i++) {
        p = queue[i]
        print p
        m = split(kids[p], c, " ")
        for (j = 1; j <= m; j++) queue[++n] = c[j]
      }
    }'
}

CLK_TCK=$(getconf CLK_TCK)
# CPU seconds used so far by the given processes, their descendants and their reaped children.
tree_cpu() {
  local files=()
  local p
  for p in $(descendants "$@"); do files+=("/proc/$p/stat"); done
  # Fields after the ") " that ends the command name: utime stime cutime cstime are 12..15.
  # A forked child may exit between `ps` and `cat`: a missing file is not an error.
  { cat "${files[@]}" 2>/dev/null || true; } | sed 's/^.*) //' |
    awk -v hz="$CLK_TCK" '{ t += $12 + $13 + $14 + $15 } END { printf "%.2f", t / hz }'
}

# "RSS_KB PSS_KB PROCS" summed over the given processes and their descendants.
tree_mem() {
  local status=() rollup=()
  local p
  for p in $(descendants "$@"); do
    status+=("/proc/$p/status")
    rollup+=("/proc/$p/smaps_rollup")
  done
  local rss pss
  rss=$({ cat "${status[@]}" 2>/dev/null || true; } | awk '/^VmRSS:/ { s += $2 } END { print s + 0 }')
  pss=$({ cat "${rollup[@]}" 2>/dev/null || true; } | awk '/^Pss:/ { s += $2 } END { print s + 0 }')
  echo "$rss $pss ${#status[@]}"
}

start_bg() {  # NAME CMD...: starts CMD in the background, logs to $T/NAME.log, sets BG_PID
  local name=$1
  shift
  "$@" >"$T/$name.log" 2>&1 &
  BG_PID=$!
  PIDS+=("$BG_PID")
}

alive() { kill -0 "$1" 2>/dev/null; }
delta() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }  # A B: B - A

# A peer whose port does not come up is skipped, not fatal.
peer_up() {  # NAME PORT [TIMEOUT_S]
  if wait_listen "$2" "${3:-10}"; then return 0; fi
  SKIPPED+="$1(did not start: see its log) "
  tail -3 "$T/$1.log" >&2 || true
  unset "PORT[$1]"
}

RAW=$T/raw.jsonl
: >"$RAW"

# ---- backend ----

"$LG" serve --listen 127.0.0.1:0 >"$T/backend.out" 2>"$T/backend.err" &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
for _ in $(seq 100); do [[ -s $T/backend.out ]] && break; sleep 0.05; done
BPORT=$(jq -r '.listen' "$T/backend.out" | sed 's/.*://')
USED_PORTS+="$BPORT "
log "backend (loadgen serve) on 127.0.0.1:$BPORT"

# Per peer: the port the client connects to, the preamble file it sends (empty: none), the
# processes that make up the peer (their CPU and memory are the peer's), and client-side
# helpers (the TLS client; counted in "all" CPU, not in the peer's).
declare -A PORT PREAMBLE PROCS HELPERS
PORT[direct]=$BPORT
PREAMBLE[direct]=""
PROCS[direct]=""

# ---- brokerproxy ----

# One daemon per path (plain, TLS, SSH), each with its own state_dir, port and job `bench`, so
# that each path's memory is measured on a fresh process. Sets DPORT, DPID and writes the
# job's preamble and secret to $T/NAME/.
declare -A DAEMON_PIDS
start_daemon() {  # NAME
  local name=$1 secret
  DPORT=$(free_port)
  mkdir -p "$T/$name/state"
  cat >"$T/$name/config.ini" <<EOF
[broker]
state_dir = $T/$name/state
log_level = warn

[proxy]
listen = 127.0.0.1:$DPORT
max_connections = 9500
EOF
  # Started through a symlink of another name: on a shared machine, someone's clean-up by
  # process name (`killall brokerproxy`) must not end the run halfway.
  ln -sf "$BP" "$T/bp-e2e-daemon"
  start_bg "daemon-$name" "$T/bp-e2e-daemon" run -c "$T/$name/config.ini"
  DPID=$BG_PID
  DAEMON_PIDS[$name]=$DPID
  wait_listen "$DPORT"
  "$BP" save ssh --job-id bench --port "$BPORT" --host 127.0.0.1 --json -c "$T/$name/config.ini" \
    >"$T/$name/save.json"
  secret=$(jq -r '.job.secret' "$T/$name/save.json")
  [[ $secret =~ ^[0-9a-f]+$ ]] || { echo "e2e.sh: no secret in the save reply" >&2; exit 1; }
  (umask 077 && printf 'BROKER1 bench %s\n' "$secret" >"$T/$name/preamble" &&
    printf '%s\n' "$secret" >"$T/$name/secret")
  log "brokerproxy '$name' (pid $DPID) on 127.0.0.1:$DPORT, job 'bench' saved"
}

start_daemon plain
PPORT=$DPORT DAEMON_PID=$DPID
PORT[brokerproxy]=$PPORT
PREAMBLE[brokerproxy]=$T/plain/preamble
PROCS[brokerproxy]=$DAEMON_PID
# The same daemon, with the probe byte sent in the preamble's write, as the protocol allows
# (the proxy keeps bytes sent before its OK): the round trip to OK no longer delays the data.
# Handshakes only.
PORT[brokerproxy-pipelined]=$PPORT
PREAMBLE[brokerproxy-pipelined]=$T/plain/preamble
PROCS[brokerproxy-pipelined]=$DAEMON_PID

# ---- peers ----

wanted() { [[ " $PEERS " == *" $1 "* ]]; }
SKIPPED=""

if wanted socat; then
  if command -v socat >/dev/null; then
    p=$(free_port)
    start_bg socat socat "TCP-LISTEN:$p,bind=127.0.0.1,fork,reuseaddr,backlog=4096" "TCP:127.0.0.1:$BPORT"
    PORT[socat]=$p PREAMBLE[socat]="" PROCS[socat]=$BG_PID
    peer_up socat "$p" || true
  else
    SKIPPED+="socat(not installed) "
  fi
fi

# The global and defaults sections of every HAProxy here: TCP mode, maxconn 9000 (lets 8,000
# idle sessions in), and long client/server timeouts (idle sessions must stay).
haproxy_head() {  # NBTHREAD [GLOBAL_LINE] [DEFAULTS_LINE]
  cat <<EOF
global
  nbthread $1
  maxconn 9000
  ${2:-}
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  ${3:-}
EOF
}

# maxpipes keeps the splice variant's file descriptors (2 per session plus 2 per pipe) under
# the 20,000 limit.
haproxy_peer() {  # NAME EXTRA_OPTION
  local name=$1 opt=$2 p
  p=$(free_port)
  {
    haproxy_head 1 "maxpipes 500" "$opt"
    cat <<EOF
frontend in
  bind 127.0.0.1:$p
  default_backend out
backend out
  server backend 127.0.0.1:$BPORT
EOF
  } >"$T/$name.cfg"
  start_bg "$name" haproxy -db -f "$T/$name.cfg"
  PORT[$name]=$p PREAMBLE[$name]="" PROCS[$name]=$BG_PID
  peer_up "$name" "$p" || true
}
for name in haproxy haproxy-splice; do
  wanted $name || continue
  if ! command -v haproxy >/dev/null; then SKIPPED+="$name(not installed) "; continue; fi
  if [[ $name == haproxy ]]; then haproxy_peer haproxy "# no splicing"; else haproxy_peer haproxy-splice "option splice-auto"; fi
done

SSHD_PID=""
if wanted ssh-aes || wanted ssh-chacha; then
  if [[ $EUID -ne 0 ]] || [[ ! -x /usr/sbin/sshd ]]; then
    SKIPPED+="ssh(needs root and openssh-server) "
  else
    mkdir -p "$T/ssh" /run/sshd
    chmod 700 "$T/ssh"
    ssh-keygen -q -t ed25519 -N '' -f "$T/ssh/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$T/ssh/user_key"
    cp "$T/ssh/user_key.pub" "$T/ssh/authorized_keys"
    SSH_PORT=$(free_port)
    cat >"$T/ssh/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $T/ssh/host_key
PidFile none
AuthorizedKeysFile $T/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
UseDNS no
LogLevel ERROR
EOF
    start_bg sshd /usr/sbin/sshd -D -e -f "$T/ssh/sshd_config"
    SSHD_PID=$BG_PID
    wait_listen "$SSH_PORT" || { tail -3 "$T/sshd.log" >&2; exit 1; }
    for name in ssh-aes ssh-chacha; do
      wanted $name || continue
      cipher=aes128-gcm@openssh.com
      [[ $name == ssh-chacha ]] && cipher=chacha20-poly1305@openssh.com
      p=$(free_port)
      start_bg "$name" ssh -F /dev/null -N -p "$SSH_PORT" -i "$T/ssh/user_key" \
        -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o ExitOnForwardFailure=yes -o LogLevel=ERROR -o Compression=no -o Ciphers=$cipher \
        -L "127.0.0.1:$p:127.0.0.1:$BPORT" "$(id -un)@127.0.0.1"
      PORT[$name]=$p PREAMBLE[$name]="" PROCS[$name]="$BG_PID $SSHD_PID"
      peer_up "$name" "$p" 20 || true
    done
  fi
fi

# The embedded SSH endpoint, with the same stock client and ciphers as ssh-aes and ssh-chacha:
# user = job id, password = the job's secret (from an askpass script, so it is in no argv).
if wanted brokerproxy-ssh-aes || wanted brokerproxy-ssh-chacha; then
  if ! command -v ssh >/dev/null; then
    SKIPPED+="brokerproxy-ssh(needs openssh-client) "
  else
    start_daemon ssh
    SSH_DAEMON_PID=$DPID SSH_DAEMON_PORT=$DPORT
    printf '#!/bin/sh\nexec cat %q\n' "$T/ssh/secret" >"$T/ssh/askpass"
    chmod 700 "$T/ssh/askpass"
    mkdir -p "$T/ssh/home"
    for name in brokerproxy-ssh-aes brokerproxy-ssh-chacha; do
      wanted $name || continue
      cipher=aes128-gcm@openssh.com
      [[ $name == *chacha ]] && cipher=chacha20-poly1305@openssh.com
      p=$(free_port)
      SSH_ASKPASS=$T/ssh/askpass SSH_ASKPASS_REQUIRE=force DISPLAY=:0 HOME=$T/ssh/home SSH_AUTH_SOCK= \
        start_bg "$name" ssh -F /dev/null -N -p "$SSH_DAEMON_PORT" \
        -o PubkeyAuthentication=no -o PreferredAuthentications=password -o NumberOfPasswordPrompts=1 \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o ExitOnForwardFailure=yes -o LogLevel=ERROR -o Compression=no -o Ciphers=$cipher \
        -L "127.0.0.1:$p:bench:1" "bench@127.0.0.1"
      PORT[$name]=$p PREAMBLE[$name]="" PROCS[$name]="$BG_PID $SSH_DAEMON_PID"
      peer_up "$name" "$p" 20 || true
    done
  fi
fi

# TLS termination: brokerproxy (no SNI, so the proxy terminates; the preamble goes inside TLS)
# against HAProxy terminating TLS with the same certificate, key and chain (the daemon sends its
# CA after its certificate, so that laptops can pin it: HAProxy is given the same two, since
# the client's verification costs more with the CA than without). Both are reached through
# one HAProxy acting as the TLS client (so the loadgen stays plaintext), with the same
# settings: TLS 1.3, TLS_AES_128_GCM_SHA256, the chain verified against the broker's CA, no
# session reuse (every connection a full handshake), no tickets on either terminator.
if wanted brokerproxy-tls || wanted haproxy-tls; then
  if ! command -v haproxy >/dev/null; then
    SKIPPED+="tls(needs haproxy as the TLS client) "
  else
    start_daemon tls
    TLS_DAEMON_PID=$DPID TLS_DAEMON_PORT=$DPORT
    for _ in $(seq 100); do
      [[ -s $T/tls/state/server-key.pem && -s $T/tls/state/ca.pem ]] && break
      sleep 0.05
    done
    cat "$T/tls/state/server.pem" "$T/tls/state/ca.pem" "$T/tls/state/server-key.pem" \
      >"$T/tls/haproxy-crt.pem"
    chmod 600 "$T/tls/haproxy-crt.pem"
    HTLS_PORT=$(free_port)
    {
      haproxy_head 1
      cat <<EOF
frontend in
  bind 127.0.0.1:$HTLS_PORT ssl crt $T/tls/haproxy-crt.pem ssl-min-ver TLSv1.3 no-tls-tickets
  default_backend out
backend out
  server backend 127.0.0.1:$BPORT
EOF
    } >"$T/haproxy-tls.cfg"
    start_bg haproxy-tls haproxy -db -f "$T/haproxy-tls.cfg"
    HTLS_PID=$BG_PID
    # nbthread 2, so that the shared client is not what limits either terminator.
    p_bp=$(free_port) p_hap=$(free_port)
    server_opts="ssl verify required ca-file $T/tls/state/ca.pem ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256 no-ssl-reuse"
    {
      haproxy_head 2
      cat <<EOF
frontend to_brokerproxy
  bind 127.0.0.1:$p_bp
  default_backend brokerproxy
backend brokerproxy
  server s 127.0.0.1:$TLS_DAEMON_PORT $server_opts
frontend to_haproxy
  bind 127.0.0.1:$p_hap
  default_backend haproxy
backend haproxy
  server s 127.0.0.1:$HTLS_PORT $server_opts
EOF
    } >"$T/tls-client.cfg"
    start_bg tls-client haproxy -db -f "$T/tls-client.cfg"
    TLS_CLIENT_PID=$BG_PID
    if wait_listen "$p_bp" && wait_listen "$p_hap"; then
      if wanted brokerproxy-tls; then
        PORT[brokerproxy-tls]=$p_bp PREAMBLE[brokerproxy-tls]=$T/tls/preamble
        PROCS[brokerproxy-tls]=$TLS_DAEMON_PID HELPERS[brokerproxy-tls]=$TLS_CLIENT_PID
      fi
      if wanted haproxy-tls; then
        PORT[haproxy-tls]=$p_hap PREAMBLE[haproxy-tls]=""
        PROCS[haproxy-tls]=$HTLS_PID HELPERS[haproxy-tls]=$TLS_CLIENT_PID
        peer_up haproxy-tls "$HTLS_PORT" || true
      fi
    else
      SKIPPED+="tls(the TLS client did not start: see its log) "
      tail -3 "$T/tls-client.log" >&2 || true
    fi
  fi
fi

ACTIVE=""
for p in $PEERS; do [[ -n ${PORT[$p]:-} ]] && ACTIVE+="$p "; done
log "peers: $ACTIVE${SKIPPED:+ (skipped: $SKIPPED)}"

# ---- measurement runs ----

# Appends one loadgen result to the raw file, tagged with the peer, repetition and the CPU the
# peer's processes (and its client-side helpers, and the backend) used during the run.
run_loadgen() {  # PEER REP MODE ARGS...
  local peer=$1 rep=$2 mode=$3
  shift 3
  local args=(--connect "127.0.0.1:${PORT[$peer]}")
  [[ -n ${PREAMBLE[$peer]} ]] && args+=(--preamble-file "${PREAMBLE[$peer]}")
  # `connect` sends its first bytes behind the preamble, and so do these peers' clients: the
  # TLS path through `connect --tls` pipelines as the plain one does. Only handshakes have
  # first bytes to pipeline (loadgen takes --pipeline in that mode alone).
  if [[ $mode == handshake && ($peer == brokerproxy-pipelined || $peer == brokerproxy-tls) ]]; then
    args+=(--pipeline)
  fi
  local procs=${PROCS[$peer]} helpers=${HELPERS[$peer]:-}
  local cpu0=0 cpu1=0 hcpu0=0 hcpu1=0 bcpu0 bcpu1 out
  [[ -n $procs ]] && cpu0=$(tree_cpu $procs)
  [[ -n $helpers ]] && hcpu0=$(tree_cpu $helpers)
  bcpu0=$(tree_cpu "$BACKEND_PID")
  out=$("$LG" "$mode" "${args[@]}" "$@" 2>>"$T/loadgen.err") || true
  [[ -n $procs ]] && cpu1=$(tree_cpu $procs)
  [[ -n $helpers ]] && hcpu1=$(tree_cpu $helpers)
  bcpu1=$(tree_cpu "$BACKEND_PID")
  if [[ -z $out ]]; then
    out="{\"mode\":\"$mode\",\"ok\":false,\"errors\":{\"loadgen produced no output\":1}}"
  fi
  jq -c --arg peer "$peer" --argjson rep "$rep" --argjson cpu "$(delta "$cpu0" "$cpu1")" \
    --argjson hcpu "$(delta "$hcpu0" "$hcpu1")" --argjson bcpu "$(delta "$bcpu0" "$bcpu1")" \
    --argjson has_procs "$([[ -n $procs ]] && echo true || echo false)" \
    '. + {peer: $peer, rep: $rep, backend_cpu_s: $bcpu, helper_cpu_s: $hcpu}
       + (if $has_procs then {peer_cpu_s: $cpu} else {} end)' \
    <<<"$out" >>"$RAW"
  if [[ $(jq -r '.ok' <<<"$out") != true ]]; then log "  FAILED: $peer $mode $*: $(jq -c '.errors' <<<"$out")"; fi
  local d
  for d in "${!DAEMON_PIDS[@]}"; do
    alive "${DAEMON_PIDS[$d]}" || log "brokerproxy '$d' DIED (see its log)"
  done
}

run_seconds() {  # PEER
  case $1 in
    *ssh-* | *-tls) echo "$ENC_RUN_S" ;;
    *) echo "$RUN_S" ;;
  esac
}

rotate() {  # N WORDS...: the words rotated left by N
  local n=$1
  shift
  local a=("$@") k=${#a[@]} i
  for ((i = 0; i < k; i++)); do printf '%s ' "${a[(i + n) % k]}"; done
}

# Memory first, while every peer is fresh (nothing has grown its pools or left TIME_WAIT
# sockets yet): RSS (and PSS) of the peer's processes idle, with K established idle sessions,
# and after they are closed again. Per session = (RSS with K - RSS idle) / K, against the one
# idle baseline taken before the peer's first session.
MEM_MIN=$(tr ' ' '\n' <<<"$IDLE_COUNTS" | sort -n | head -1)
run=0
for peer in $MEM_PEERS; do
  [[ -n ${PORT[$peer]:-} && -n ${PROCS[$peer]} ]] || continue
  read -r rss_idle pss_idle _ <<<"$(tree_mem ${PROCS[$peer]})"
  for k in $IDLE_COUNTS; do
    if [[ $peer == socat || $peer == *ssh-* ]] && ((k > MEM_MIN)); then continue; fi
    run=$((run + 1))
    out=$T/idle-$run.out err=$T/idle-$run.err
    read -r rss0 pss0 _ <<<"$(tree_mem ${PROCS[$peer]})"
    args=(--connect "127.0.0.1:${PORT[$peer]}" --count "$k" --parallel 64)
    [[ -n ${PREAMBLE[$peer]} ]] && args+=(--preamble-file "${PREAMBLE[$peer]}")
    "$LG" idle "${args[@]}" >"$out" 2>"$err" &
    idle_pid=$!
    PIDS+=("$idle_pid")
    deadline=$((SECONDS + 120))
    while [[ ! -s $out ]] && alive "$idle_pid" && ((SECONDS < deadline)); do sleep 0.1; done
    sleep 1
    read -r rss1 pss1 n1 <<<"$(tree_mem ${PROCS[$peer]})"
    fds=""
    [[ $peer == brokerproxy* ]] && fds=$(ls "/proc/${PROCS[$peer]##* }/fd" | wc -l)
    kill -TERM "$idle_pid" 2>/dev/null || true
    wait "$idle_pid" 2>/dev/null || true
    sleep 1.5
    read -r rss2 pss2 _ <<<"$(tree_mem ${PROCS[$peer]})"
    idle_json=$(cat "$out" 2>/dev/null || true)
    [[ -n $idle_json ]] || idle_json='{"ok":false,"established":0}'
    jq -c --arg peer "$peer" --argjson k "$k" --argjson rssi "$rss_idle" --argjson pssi "$pss_idle" \
      --argjson rss0 "$rss0" --argjson rss1 "$rss1" --argjson rss2 "$rss2" \
      --argjson pss0 "$pss0" --argjson pss1 "$pss1" --argjson pss2 "$pss2" \
      --argjson procs "$n1" --arg fds "$fds" --arg endline "$(tail -1 "$err" 2>/dev/null)" \
      '{mode: "memory", peer: $peer, sessions: $k, ok: .ok, established: .established,
        errors: .errors, rss_idle_kb: $rssi, rss_before_kb: $rss0, rss_kb: $rss1,
        rss_after_kb: $rss2, pss_idle_kb: $pssi, pss_before_kb: $pss0, pss_kb: $pss1,
        pss_after_kb: $pss2, processes: $procs,
        daemon_fds: (if $fds == "" then null else ($fds | tonumber) end),
        idle_end: (try ($endline | fromjson) catch null),
        bytes_per_session: (if .established > 0 then (($rss1 - $rssi) * 1024 / .established | floor) else null end),
        pss_bytes_per_session: (if .established > 0 then (($pss1 - $pssi) * 1024 / .established | floor) else null end)}' \
      <<<"$idle_json" >>"$RAW"
    log "memory $peer x$k: RSS idle ${rss_idle}, before ${rss0}, with $(jq -r .established <<<"$idle_json") sessions ${rss1}, after close ${rss2} kB"
  done
done

read -r -a ACTIVE_ARR <<<"$ACTIVE"
log "throughput: $REPS reps x {1,8} streams x {up,down} x ${#ACTIVE_ARR[@]} peers, ${RUN_S}s each (encrypted ${ENC_RUN_S}s)"
for ((rep = 1; rep <= REPS; rep++)); do
  for cfg in "1 up" "1 down" "8 up" "8 down"; do
    read -r streams dir <<<"$cfg"
    for peer in $(rotate $((rep - 1)) "${ACTIVE_ARR[@]}"); do
      run_loadgen "$peer" "$rep" throughput --streams "$streams" --bytes "$TRANSFER" \
        --direction "$dir" --seconds "$(run_seconds "$peer")"
    done
  done
  log "  throughput rep $rep done"
done

log "handshakes: $REPS reps x concurrency {1,32} x ${#ACTIVE_ARR[@]} peers, ${RUN_S}s each (encrypted ${ENC_RUN_S}s)"
for ((rep = 1; rep <= REPS; rep++)); do
  for conc in 1 32; do
    for peer in $(rotate $((rep - 1)) "${ACTIVE_ARR[@]}" brokerproxy-pipelined); do
      run_loadgen "$peer" "$rep" handshake --concurrency "$conc" --seconds "$(run_seconds "$peer")"
    done
  done
  log "  handshake rep $rep done"
done

# Slow readers: the peer's memory while SLOW_STREAMS clients each read 64 KiB every 10 ms from a
# backend that sends as fast as it can.
for peer in $MEM_PEERS; do
  [[ -n ${PORT[$peer]:-} && -n ${PROCS[$peer]} ]] || continue
  sleep 0.5
  read -r rss0 pss0 _ <<<"$(tree_mem ${PROCS[$peer]})"
  args=(--connect "127.0.0.1:${PORT[$peer]}" --streams "$SLOW_STREAMS" --seconds 3)
  [[ -n ${PREAMBLE[$peer]} ]] && args+=(--preamble-file "${PREAMBLE[$peer]}")
  "$LG" slowread "${args[@]}" >"$T/slow.out" 2>>"$T/loadgen.err" &
  slow_pid=$!
  PIDS+=("$slow_pid")
  max_rss=$rss0 max_pss=$pss0 max_pipes=0
  while alive "$slow_pid"; do
    read -r r s _ <<<"$(tree_mem ${PROCS[$peer]})"
    ((r > max_rss)) && max_rss=$r
    ((s > max_pss)) && max_pss=$s
    if [[ $peer == brokerproxy* ]]; then
      pipes=$(ls -l "/proc/${PROCS[$peer]##* }/fd" 2>/dev/null | grep -c 'pipe:' || true)
      ((pipes > max_pipes)) && max_pipes=$pipes
    fi
    sleep 0.2
  done
  wait "$slow_pid" 2>/dev/null || true
  slow_json=$(cat "$T/slow.out" 2>/dev/null || true)
  [[ -n $slow_json ]] || slow_json='{"ok":false}'
  jq -c --arg peer "$peer" --argjson rss0 "$rss0" --argjson rss "$max_rss" --argjson pss0 "$pss0" \
    --argjson pss "$max_pss" --argjson pipes "$max_pipes" \
    '{mode: "slowread-memory", peer: $peer, ok: .ok, streams: .streams, mbyte_per_s: .mbyte_per_s,
      errors: .errors, rss_idle_kb: $rss0, rss_max_kb: $rss, pss_idle_kb: $pss0, pss_max_kb: $pss,
      daemon_pipe_fds_max: (if $peer | startswith("brokerproxy") then $pipes else null end)}' \
    <<<"$slow_json" >>"$RAW"
  log "slow readers $peer: RSS ${rss0} -> max ${max_rss} kB"
done

# Optional: where the daemon spends its time accepting connections.
if [[ $PROFILE == 1 ]] && command -v perf >/dev/null; then
  log "profiling the daemon during a concurrency-32 handshake run"
  # perf needs a moment to attach; it records a little longer than the run on both sides.
  perf record -F 2999 -g -p "$DAEMON_PID" -o "$T/perf.data" -- sleep "$(awk -v s="$RUN_S" 'BEGIN { print s + 1 }')" \
    >/dev/null 2>&1 &
  perf_pid=$!
  sleep 0.5
  "$LG" handshake --connect "127.0.0.1:$PPORT" --preamble-file "$T/plain/preamble" --concurrency 32 \
    --seconds "$RUN_S" >"$T/profile-run.json" 2>>"$T/loadgen.err" || true
  wait "$perf_pid" || true
  mkdir -p "$OUT"
  report() { perf report -i "$T/perf.data" --stdio -g none "$@" 2>/dev/null | grep -E '^ +[0-9]' | sed 's/ *$//'; }
  {
    echo "# perf record -F 2999 -g -p <daemon> during: $(cat "$T/profile-run.json")"
    echo
    echo "## Samples by object"
    report --no-children --sort dso
    echo
    echo "## Self time by symbol (>= 0.4%)"
    report --no-children --sort dso,symbol --percent-limit 0.4
    echo
    echo "## Inclusive time by system call"
    report --children --sort symbol | grep -E '\] (__x64_sys_|__do_sys_)' || true
    echo
    echo "## Self time in brokerproxy's own code, libuv, libc, libstdc++ and libcrypto (>= 0.05%)"
    report --no-children --sort dso,symbol --percent-limit 0.05 |
      grep -E 'brokerproxy|bp-e2e-daemon|libuv|libc\.so|libstdc|libcrypto' | head -40
  } >"$OUT/e2e-profile.txt" || true
fi

# Optional: system calls per connection, brokerproxy next to HAProxy (strace slows both down, so
# only the counts matter, not the rates).
if [[ $PROFILE == 1 ]] && command -v strace >/dev/null; then
  mkdir -p "$OUT"
  {
    echo "# strace -c -f of the proxy during \`loadgen handshake --concurrency 1 --seconds 1\`;"
    echo "# calls and errors divided by the connections completed in that run."
    for peer in brokerproxy haproxy; do
      [[ -n ${PORT[$peer]:-} && -n ${PROCS[$peer]} ]] || continue
      args=(--connect "127.0.0.1:${PORT[$peer]}" --concurrency 1 --seconds 1)
      [[ -n ${PREAMBLE[$peer]} ]] && args+=(--preamble-file "${PREAMBLE[$peer]}")
      strace -c -f -o "$T/strace-$peer.txt" -p "${PROCS[$peer]%% *}" >/dev/null 2>&1 &
      strace_pid=$!
      sleep 0.5
      conns=$("$LG" handshake "${args[@]}" 2>>"$T/loadgen.err" | jq -r '.connections') || conns=0
      kill -INT "$strace_pid" 2>/dev/null || true
      wait "$strace_pid" 2>/dev/null || true
      echo
      echo "## $peer: $conns connections"
      printf '%-14s %10s %10s\n' syscall calls/conn errors/conn
      awk -v n="$conns" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {
          err = ($5 ~ /^[0-9]+$/) ? $5 : 0
          printf "%-14s %10.2f %10.2f\n", $NF, $4 / n, err / n
          calls += $4; errs += err }
        END { printf "%-14s %10.2f %10.2f\n", "TOTAL", calls / n, errs / n }' "$T/strace-$peer.txt"
    done
  } >"$OUT/e2e-syscalls.txt" 2>&1 || true
fi

# ---- facts, summary, report ----

# Every daemon's counters, keyed by its name; alive only if all of them are.
DAEMON_ALIVE=true
STATS='{}'
DAEMON_LOG_LINES=0
: >"$T/daemons.log"
for d in "${!DAEMON_PIDS[@]}"; do
  st='{}'
  if alive "${DAEMON_PIDS[$d]}"; then
    st=$("$BP" stats --json -c "$T/$d/config.ini" 2>/dev/null || echo '{}')
  else
    DAEMON_ALIVE=false
  fi
  STATS=$(jq -c --arg d "$d" --argjson st "$st" '. + {($d): $st}' <<<"$STATS")
  DAEMON_LOG_LINES=$((DAEMON_LOG_LINES + $(wc -l <"$T/daemon-$d.log")))
  sed "s/^/[$d] /" "$T/daemon-$d.log" >>"$T/daemons.log"
done

ver() { "$@" 2>&1 | head -1 | tr -d '"' || true; }
FACTS=$(jq -n \
  --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --arg nproc "$(nproc)" \
  --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
  --arg kernel "$(uname -sr)" \
  --arg loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
  --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo '+dirty-src')" \
  --arg libuv "$(pkg-config --modversion libuv 2>/dev/null)" \
  --arg compiler "$(ver c++ --version)" \
  --arg haproxy "$(ver haproxy -v)" \
  --arg socat "$(socat -V 2>/dev/null | awk '/socat version/ {print $3; exit}')" \
  --arg openssh "$(ver ssh -V)" \
  --arg nofile "$(ulimit -n)" \
  --arg pipe_max "$(cat /proc/sys/fs/pipe-max-size)" \
  --arg reps "$REPS" --arg run_s "$RUN_S" --arg enc_run_s "$ENC_RUN_S" --arg transfer "$TRANSFER" \
  --arg skipped "$SKIPPED" --argjson daemon_alive "$DAEMON_ALIVE" \
  --arg daemon_log_lines "$DAEMON_LOG_LINES" --arg duration "$SECONDS" \
  '{date: $date, nproc: ($nproc | tonumber), cpu: $cpu, kernel: $kernel, loadavg_at_end: $loadavg_end,
    commit: $commit, libuv: $libuv, compiler: $compiler, haproxy: $haproxy, socat: $socat,
    openssh: $openssh, open_files_limit: $nofile, pipe_max_size: $pipe_max,
    reps: ($reps | tonumber), run_seconds: ($run_s | tonumber),
    encrypted_run_seconds: ($enc_run_s | tonumber), transfer: $transfer,
    skipped: $skipped, daemon_alive_at_end: $daemon_alive,
    daemon_log_lines: ($daemon_log_lines | tonumber), duration_s: ($duration | tonumber)}')
FACTS=$(jq -c --arg load_start "$LOAD_START" '. + {loadavg_at_start: $load_start}' <<<"$FACTS")

mkdir -p "$OUT"
cp "$RAW" "$OUT/e2e-raw.jsonl"
head -c 20000 "$T/daemons.log" >"$OUT/e2e-daemon.log" || true
jq -s --argjson facts "$FACTS" --argjson stats "$STATS" -f "$ROOT/bench/e2e_summary.jq" "$RAW" >"$OUT/e2e.json"
jq -r -f "$ROOT/bench/e2e_table.jq" "$OUT/e2e.json" >"$OUT/e2e.md"

if command -v gnuplot >/dev/null; then
  jq -r '.summary.throughput | (["peer"] + (.[0].configs | map(.config))) as $h | ($h | @tsv),
         (.[] | [.peer] + (.configs | map(.gbit_per_s.median)) | @tsv)' "$OUT/e2e.json" >"$T/tput.tsv"
  jq -r '.summary.handshake | (["peer", "c1", "c32"] | @tsv),
         (.[] | [.peer, .c1.conns_per_s.median, .c32.conns_per_s.median] | @tsv)' "$OUT/e2e.json" >"$T/hs.tsv"
  gnuplot <<EOF || log "gnuplot failed"
set terminal pngcairo size 1100,520 noenhanced font "sans,10"
set datafile separator "\t"
set output "$OUT/e2e-throughput.png"
set title "Throughput through each peer, median of $REPS (Gbit/s, loopback, 2 cores shared)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set key outside right top
set ylabel "Gbit/s"
set grid ytics
set yrange [0:*]
set xtics rotate by -20
plot for [i=2:5] "$T/tput.tsv" using i:xtic(1) title columnheader(i)
set output "$OUT/e2e-handshake.png"
set title "Connections per second (connect, [preamble, OK,] 1-byte echo, close), median of $REPS"
set ylabel "connections/s"
plot for [i=2:3] "$T/hs.tsv" using i:xtic(1) title columnheader(i)
EOF
fi

log "done in ${SECONDS}s: $OUT/e2e.md"
cat "$OUT/e2e.md"
