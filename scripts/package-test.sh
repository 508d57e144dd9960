#!/usr/bin/env bash
# The Debian package, for real, on this machine:
#
#   scripts/package-test.sh [BUILD_DIR]      BUILD_DIR defaults to build (scripts/demo.sh's)
#
# builds the .deb in BUILD_DIR (cpack), installs it with apt, checks what it installed (the
# system user, the state directory, the conffile, the manual pages, the unit with
# systemd-analyze), runs the installed daemon as the unprivileged `brokerproxy` user with the
# installed /etc/brokerproxy/config.ini, makes a save / connect round trip through it as
# another user, then purges the package and checks that nothing of it is left.
#
# Root only, and it changes the system: it refuses to run (exit 77, "skipped") where
# brokerproxy is installed already. CTest runs it as PackageTest (label `package`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-$ROOT/build}
[[ $BUILD == /* ]] || BUILD=$ROOT/$BUILD
skip() { echo "package-test: skipped: $*"; exit 77; }
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || skip "needs root (it installs a package)"
command -v apt-get >/dev/null || skip "no apt-get here"
if dpkg-query -W -f='${Status}' brokerproxy 2>/dev/null | grep -q "install ok installed"; then
  skip "brokerproxy is installed on this machine; not touching it"
fi
[[ -x $BUILD/brokerproxy ]] || fail "$BUILD/brokerproxy not built"
# The daemon runs as its system user: where no user but root can run programs (a root
# directory other users cannot search, as in a bare chroot), there is nothing to test.
setpriv --reuid nobody --regid nogroup --clear-groups /bin/true 2>/dev/null ||
  skip "users other than root cannot run programs here"

T=$(mktemp -d /tmp/bp-package.XXXXXX)
chmod 777 "$T"  # the test user writes what it echoed here
DAEMON_PID="" BACKEND_PID=""
cleanup() {
  [[ -n $DAEMON_PID ]] && kill "$DAEMON_PID" 2>/dev/null || true
  [[ -n $BACKEND_PID ]] && kill "$BACKEND_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  if dpkg-query -W -f='${Status}' brokerproxy 2>/dev/null | grep -q "installed"; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq brokerproxy >/dev/null 2>&1 || true
  fi
  rm -rf "$T"
}
trap cleanup EXIT

echo "== cpack in $BUILD"
rm -f "$BUILD"/brokerproxy_*.deb
(cd "$BUILD" && cpack -G DEB >"$T/cpack.log" 2>&1) || { cat "$T/cpack.log"; fail "cpack"; }
deb=$(ls "$BUILD"/brokerproxy_*.deb)
dpkg-deb -f "$deb" Package Version Depends

echo "== apt-get install $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >"$T/apt.log" 2>&1 ||
  { cat "$T/apt.log"; fail "apt-get install"; }
[[ -x /usr/bin/brokerproxy ]] || fail "no /usr/bin/brokerproxy"
getent passwd brokerproxy >/dev/null || fail "no system user brokerproxy"
[[ $(getent passwd brokerproxy | cut -d: -f7) == */nologin ]] || fail "the system user has a shell"
[[ $(stat -c '%U %a' /var/lib/brokerproxy) == "brokerproxy 711" ]] ||
  fail "/var/lib/brokerproxy: $(stat -c '%U %a' /var/lib/brokerproxy)"
dpkg-query -W -f='${Conffiles}\n' brokerproxy | grep -q "/etc/brokerproxy/config.ini" ||
  fail "/etc/brokerproxy/config.ini is not a conffile"
grep -qx "control_socket = /run/brokerproxy/control.sock" /etc/brokerproxy/config.ini ||
  fail "the site config does not name the runtime control socket"
for page in /usr/share/man/man1/brokerproxy.1 /usr/share/man/man5/brokerproxy.ini.5; do
  [[ -s $page ]] || fail "no $page"
done
unit=$(dpkg -L brokerproxy | grep '/systemd/system/brokerproxy.service$')
if command -v systemd-analyze >/dev/null; then
  # Documentation=man:... is checked with man(1) where it is installed.
  man_check=no
  command -v man >/dev/null && man_check=yes
  systemd-analyze verify --man=$man_check "$unit" || fail "systemd-analyze verify $unit"
  systemd-analyze security --offline=true "$unit" 2>/dev/null | tail -1
else
  echo "(systemd-analyze not installed: the unit was not verified)"
fi

echo "== the installed daemon, as the brokerproxy user"
# What systemd's RuntimeDirectory= would make.
install -d -o brokerproxy -g brokerproxy -m 0755 /run/brokerproxy
setpriv --reuid brokerproxy --regid brokerproxy --init-groups --inh-caps=-all \
  /usr/bin/brokerproxy run -c /etc/brokerproxy/config.ini --listen 127.0.0.1:0 \
  >"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 200); do grep -q "brokerproxy started" "$T/daemon.log" && break; sleep 0.05; done
grep "brokerproxy started" "$T/daemon.log" || { cat "$T/daemon.log"; fail "the daemon did not start"; }
[[ $(stat -c %U "/proc/$DAEMON_PID") == brokerproxy ]] || fail "the daemon does not run as brokerproxy"
grep -q "^CapEff:	0000000000000000" "/proc/$DAEMON_PID/status" || fail "the daemon holds capabilities"

# A job's service (an echo server) and its user: the round trip as someone who is neither root
# nor the daemon's user.
user=bp-pkgtest
getent passwd $user >/dev/null || useradd --no-create-home --shell /usr/sbin/nologin $user
cat >"$T/echo.py" <<'EOF'
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
EOF
setpriv --reuid $user --regid $user --init-groups /usr/bin/python3 "$T/echo.py" >"$T/echo.port" &
BACKEND_PID=$!
for _ in $(seq 100); do [[ -s $T/echo.port ]] && break; sleep 0.05; done
port=$(cat "$T/echo.port")
[[ $port =~ ^[0-9]+$ ]] || fail "the echo service did not start"
as_user() { (cd "$T" && setpriv --reuid $user --regid $user --init-groups env -i PATH=/usr/bin:/bin "$@"); }
as_user brokerproxy save ssh --job-id pkgtest --port "$port" --host 127.0.0.1 >/dev/null ||
  fail "save as $user"
as_user brokerproxy query | grep -q pkgtest || fail "query as $user does not show the job"
head -c 100000 /dev/urandom >"$T/payload"
chmod 644 "$T/payload"
proxy=$(sed -n 's/.*proxy port \([^ ]*\).*/\1/p' "$T/daemon.log" | head -1)
as_user sh -c "cat payload | timeout 20 brokerproxy connect pkgtest --stdio --proxy $proxy | cat >echoed" ||
  fail "connect --stdio through $proxy"
cmp "$T/payload" "$T/echoed" || fail "the echo differs from what was sent"
echo "round trip: $(stat -c %s "$T/echoed") bytes through $proxy, as $user, to a daemon running as brokerproxy"
kill "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=""
grep -q "brokerproxy stopped" "$T/daemon.log" || { cat "$T/daemon.log"; fail "the daemon did not stop cleanly"; }

echo "== apt-get purge brokerproxy"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq brokerproxy >"$T/purge.log" 2>&1 ||
  { cat "$T/purge.log"; fail "apt-get purge"; }
for left in /usr/bin/brokerproxy /etc/brokerproxy /var/lib/brokerproxy "$unit" \
  /usr/share/man/man1/brokerproxy.1; do
  [[ ! -e $left ]] || fail "$left is left after purge"
done
! dpkg-query -W brokerproxy >/dev/null 2>&1 ||
  dpkg-query -W -f='${Status}\n' brokerproxy | grep -q "not-installed" || fail "dpkg still knows it"
rm -rf /run/brokerproxy
echo "package-test: OK"
