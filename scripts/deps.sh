#!/usr/bin/env bash
# Installs what building brokerproxy and its Debian package needs (Debian 12 packages only;
# `file` is what CPack's dependency scan runs on the binary); with --test, also the
# real peers and tools the test suite drives (sshd, socat, haproxy, chromium, curl, iptables,
# strace, redis-server, redis-sentinel and redis-tools for the registry on Redis, slurmctld,
# slurmd, slurm-client, munge for a private Slurm, and jupyter-notebook, python3-websocket,
# sshpass for the laptop-side tests that drive a real notebook, systemd and man-db for checking
# the packaged unit and manual pages, prometheus for promtool, which checks the metrics
# endpoint's output); with --fuzz, clang and its libFuzzer and sanitizer runtimes
# (scripts/fuzz.sh only; the tests do not need clang).
set -euo pipefail
build=(build-essential cmake ninja-build pkg-config libuv1-dev libssh-dev libssl-dev
       libcjson-dev libcli11-dev prometheus-cpp-dev libhttp-parser-dev
       libhiredis-dev libbenchmark-dev libgtest-dev socat procps file)
test=(openssh-server openssh-client haproxy chromium libnss3-tools curl ca-certificates
      openssl iproute2 iptables strace slurmctld slurmd slurm-client munge
      jupyter-notebook python3-websocket sshpass systemd man-db prometheus redis-server
      redis-sentinel redis-tools)
fuzz=(clang libclang-rt-14-dev)
want=("${build[@]}")
[ "${1:-}" = "--test" ] && want+=("${test[@]}")
[ "${1:-}" = "--fuzz" ] && want+=("${fuzz[@]}")
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  # munge's post-install makes its key as the munge user (su munge -c mungekey), which fails
  # where that user cannot run /bin/sh (a root directory of mode 0700, as in a bare chroot).
  # The tests run their own munged with their own key, so a key made here does as well.
  if [[ " ${missing[*]} " == *" munge "* && ! -e /etc/munge/munge.key ]]; then
    install -d -m 0700 /etc/munge
    head -c 1024 /dev/urandom > /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
