// End-to-end test harness: the real `brokerproxy` binary in child processes, backends in
// threads of the test process, everything on 127.0.0.1 with ports picked by the kernel.
//
// Every wait has a deadline, every child is stopped by PID when its owner goes, and every
// temporary directory is removed.

#ifndef BROKERPROXY_TESTS_E2E_HARNESS_H_
#define BROKERPROXY_TESTS_E2E_HARNESS_H_

#include <gtest/gtest.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "registry/json.h"

namespace brokerproxy::testing {

// The brokerproxy executable under test.
std::string BinaryPath();

// A fresh directory under /tmp (short paths: Unix sockets allow 107 bytes), removed with
// everything in it on destruction. Mode 0711 so other users (the `nobody` tests) can reach
// sockets inside it.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& data, int mode = 0644);
std::string ReadFile(const std::string& path);

struct RunOptions {
  std::string stdin_data;
  std::optional<uid_t> uid;  // run as this user (and its primary group), e.g. 65534 = nobody
  int timeout_ms = 60000;
  std::vector<std::string> env;  // extra "NAME=value" entries
  std::string binary;            // Daemon::Cli: run this copy of brokerproxy instead
};

struct RunResult {
  int exit_code = -1;  // 128 + signal if killed
  std::string out;
  std::string err;
  bool timed_out = false;
};
std::ostream& operator<<(std::ostream& os, const RunResult& r);

// Runs a command to completion (killed at the deadline).
RunResult RunCommand(const std::vector<std::string>& argv, const RunOptions& options = {});

// A long-running child (daemon, `connect --listen`, sshd), output appended to a file.
class Child {
 public:
  static std::unique_ptr<Child> Spawn(const std::vector<std::string>& argv,
                                      const std::string& output_path,
                                      const RunOptions& options = {});
  ~Child();  // SIGKILL if still running
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  // Waits until a line containing `needle` was written; returns that line.
  std::optional<std::string> WaitFor(const std::string& needle, int timeout_ms = 20000);
  std::string Output() const;
  bool Running();
  // Sends `signum`, waits up to `timeout_ms` (then SIGKILL); returns the exit status or 128+sig.
  int Stop(int signum = SIGTERM, int timeout_ms = 20000);
  // Waits up to `timeout_ms` for the child to exit by itself (then SIGKILL), sending it nothing.
  // Not Stop(SIGCONT): a SIGCONT that arrives while LeakSanitizer's exit-time check stops the
  // process's threads discards their pending SIGSTOP, and the check then waits forever.
  int Wait(int timeout_ms = 20000) { return Stop(0, timeout_ms); }

 private:
  Child() = default;
  pid_t pid_ = -1;
  std::string output_path_;
  std::optional<int> status_;
};

// The daemon with a config in `dir`: state_dir dir/state, control socket dir/control.sock,
// proxy on 127.0.0.1 with a free port. `extra_config` is appended to the generated file (later
// keys of a section must not repeat generated ones: pass whole extra sections). proxy_port() is
// the port of the first listen address (a test may rewrite the generated one before Start()).
class Daemon {
 public:
  Daemon(const TempDir& dir, const std::string& extra_config = "",
         const std::string& proxy_extra = "");
  ~Daemon();

  ::testing::AssertionResult Start();
  int Stop(int signum = SIGTERM);
  // Runs the daemon under a wrapper command (e.g. {"prlimit", "--nofile=100"}).
  void set_launcher(std::vector<std::string> launcher) { launcher_ = std::move(launcher); }
  bool running() const { return child_ != nullptr; }

  // Runs `brokerproxy <args> -c <config>`.
  RunResult Cli(std::vector<std::string> args, const RunOptions& options = {}) const;
  // `save ssh --port <port> --job-id <id> --json`, returning the secret ("" on failure).
  std::string SaveJob(const std::string& id, int backend_port, const std::string& type = "ssh",
                      const RunOptions& options = {}) const;

  int proxy_port() const { return proxy_port_; }
  const std::string& config_path() const { return config_path_; }
  const std::string& state_dir() const { return state_dir_; }
  const std::string& socket_path() const { return socket_path_; }
  pid_t pid() const;
  std::string Log() const;
  // After SIGUSR2: the pid of the new process that serves now, as logged since byte `from` of
  // the log; -1 while no such line is there.
  pid_t Successor(size_t from) const;
  // Resident memory (VmRSS) and open file descriptors of the daemon process.
  size_t RssBytes() const;
  int OpenFds() const;

 private:
  std::string dir_;
  std::string config_path_;
  std::string state_dir_;
  std::string socket_path_;
  std::string log_path_;
  int proxy_port_ = 0;
  std::vector<std::string> launcher_;
  std::unique_ptr<Child> child_;
};

// A backend service in threads of the test process, on 127.0.0.1:port. Each connection's first
// line says what to do:
//   "echo\n"          echo everything back; on EOF, shut down writing
//   "upload\n"        read to EOF, then reply "<sha256 hex> <bytes>\n" (tests half-close)
//   "download N\n"    send N bytes of Pattern(0..N) and close
//   "reset N\n"       send N bytes, then reset the connection (RST)
//   "slowread\n"      read 64 KiB every 10 ms until EOF
//   "banner\n"        (never sent by clients) -- see Options::banner
// With Options::banner set, the backend first sends that text itself (like sshd), then
// expects the command line.
class Backend {
 public:
  struct Options {
    std::string banner;
    // The uid that owns the listening socket (the test process's own by default). A job's
    // backend on this host must be its owner's listener, so a backend for a job saved by
    // another user is created as that user.
    std::optional<uid_t> owner;
    // The port to listen on (127.0.0.1); 0: one the kernel picks.
    int port = 0;
  };
  Backend() : Backend(Options{}) {}
  // A backend whose listener belongs to `owner`.
  static Options OwnedBy(uid_t owner) {
    Options o;
    o.owner = owner;
    return o;
  }
  explicit Backend(Options options);
  ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  int port() const { return port_; }
  // Connections that sent at least one byte: the daemon's readiness probes, which connect and
  // close without one, are not counted.
  int connections() const { return connections_.load(); }
  // Bytes the "download" and "reset" commands handed to the kernel so far, all connections.
  uint64_t sent() const { return sent_.load(); }

 private:
  void AcceptLoop();
  void Serve(int fd);

  Options options_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::atomic<uint64_t> sent_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> workers_;
  std::vector<int> fds_;
};

// A stand-in for the proxy port that records what a client sent before it got its reply. It
// serves one client: it reads until the preamble line and at least `want_early` bytes after it
// have arrived, or `wait_ms` passed; then it answers "OK\n" and echoes everything it got after
// the preamble, and all that follows, until EOF. Connections that close without sending a byte
// (readiness probes) are skipped.
class FakeProxy {
 public:
  FakeProxy(size_t want_early, int wait_ms);
  ~FakeProxy();
  FakeProxy(const FakeProxy&) = delete;
  FakeProxy& operator=(const FakeProxy&) = delete;

  int port() const { return port_; }
  // What arrived before the reply, preamble included; valid once the reply went out.
  std::string BeforeReply();

 private:
  void Serve(size_t want_early, int wait_ms);

  int listen_fd_ = -1;
  int port_ = 0;
  std::mutex mu_;
  std::string before_reply_;
  bool replied_ = false;
  std::thread thread_;
};

// A stand-in proxy that refuses every handshake with "ERR denied" and counts them.
class DenyingProxy {
 public:
  DenyingProxy();
  ~DenyingProxy();
  DenyingProxy(const DenyingProxy&) = delete;
  DenyingProxy& operator=(const DenyingProxy&) = delete;

  int port() const { return port_; }
  int handshakes() const { return handshakes_.load(); }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::atomic<int> handshakes_{0};
  std::thread thread_;
};

// Connections waiting in the backlog of the listening unix socket `path` (ss's Recv-Q); -1 if
// it cannot be told.
int PendingOnUnixSocket(const std::string& path);

// The test of `connect`'s early bytes, for any of its paths: `connect` runs `connect JOB
// --listen 127.0.0.1:0` with `fake` as its proxy (directly or behind a TLS or SSH hop). A local
// client says "hello" first; the stand-in must have had it right behind `preamble` before it
// replied, and the relay must carry on afterwards. Stops `connect`.
void ExpectConnectSendsFirstBytesEarly(Child* connect, FakeProxy* fake,
                                       const std::string& preamble);

// Sends one control request line as user `uid` straight to the daemon's socket and returns the
// reply line ("" on failure). A forked child enters the socket's directory first and then
// becomes `uid`, so no other directory has to be searchable by that user (in a bare chroot `/`
// itself may not be, and then `uid` cannot run programs at all).
std::string ControlRequestAs(uid_t uid, const std::string& socket_path, const std::string& line);
// True if `uid` can run programs here (see above).
bool CanRunAs(uid_t uid);
// True once `pid` has exited (gone, or a zombie nobody reaped yet).
bool Exited(pid_t pid);
// A real Unix user for isolation tests (e.g. "bp-alice", "bp-bob"), created with useradd (and a
// group of its own) on first use; the tests run as root. nullopt if it cannot be created.
std::optional<uid_t> TestUser(const std::string& name);
// The primary group of `uid` (from the password database; `uid` itself if it has no entry).
gid_t PrimaryGid(uid_t uid);

// Blocking TCP client helpers (every call bounded by a socket timeout).
int ConnectTcp(int port, const std::string& host = "127.0.0.1", int timeout_ms = 10000);
bool SendAll(int fd, const void* data, size_t len);
bool SendAll(int fd, const std::string& data);
// Reads up to and including '\n' (at most `max` bytes), without the newline; nullopt on EOF or
// error first.
std::optional<std::string> ReadLine(int fd, size_t max = 4096);
// Reads until EOF (at most `max` bytes).
std::string ReadToEof(int fd, size_t max = 1 << 20);

// The reply object a `--json` command printed, or nullptr.
registry::JsonPtr ParseOut(const std::string& out);
inline registry::JsonPtr ParseOut(const RunResult& r) { return ParseOut(r.out); }
// The member at `path` as text (numbers and booleans spelled out), "" if absent.
std::string JsonText(const cJSON* obj, std::initializer_list<const char*> path);

// Polls `pred` every 25 ms until it holds (true) or `timeout_ms` passed (false; `pred` is asked
// once more at the deadline, so a slow last step still counts).
bool WaitUntil(const std::function<bool()>& pred, int timeout_ms = 20000);
// Polls `count` (bytes a sender got rid of) the same way until two looks in a row give the
// same value: the sender is held back (or done). Returns the last value; after `timeout_ms`,
// whatever it is then.
uint64_t WaitUntilStill(const std::function<uint64_t()>& count, int timeout_ms = 20000);

// A loopback TCP port the test holds: a socket bound to 127.0.0.1 with SO_REUSEADDR, not
// listening. Connections to it are refused, and while it is held no socket without
// SO_REUSEADDR can bind it and no other listener can be picked on it (port 0 never yields a
// bound port), unlike a port probed free and released at once, which any process may take
// before the test uses it. A socket with SO_REUSEADDR (ListenAs, Listen() here, servers) may
// still listen on it: that is how the test's own listener takes the port over later.
class PortReservation {
 public:
  PortReservation();
  ~PortReservation() { Release(); }
  PortReservation(const PortReservation&) = delete;
  PortReservation& operator=(const PortReservation&) = delete;

  int port() const { return port_; }
  // Starts listening on the held socket and hands it over (the caller closes it); -1 on error.
  // The reservation holds nothing afterwards.
  int Listen(int backlog = 16);
  // Gives the port up.
  void Release();

 private:
  int fd_ = -1;
  int port_ = 0;
};

// How a third-party program started on a port it was given (see StartOnFreePort).
enum class PortStart { kStarted, kInUse, kFailed };

// Starts a program that cannot listen on port 0 and report the port it got (sshd, `ssh -L`,
// haproxy): `start(port, &why)` starts it on `port` and says whether it listens (kStarted),
// could not bind because the port was taken meanwhile (kInUse: it is stopped and started again
// on another port, at most `attempts` times in all) or failed otherwise (kFailed, with `why`).
// Each port is held (PortReservation) until right before `start`, so the window in which
// another process may take it is the program's own start-up. On success `*port` is the port.
::testing::AssertionResult StartOnFreePort(
    const std::function<PortStart(int port, std::string* why)>& start, int* port, int attempts = 5);

// For StartOnFreePort: waits up to `timeout_ms` for `child`, started on `port`, to listen: for
// `line` in its output (when given; sshd says "Server listening on ..."), else for a connection
// to 127.0.0.1:`port` to succeed (it is closed at once). kInUse if its output since byte `from`
// says the address was in use, kFailed if it exited or the time passed; the child is stopped
// then, and `*why` says what happened.
PortStart WaitListening(std::unique_ptr<Child>* child, int port, std::string* why, size_t from = 0,
                        const std::string& line = "", int timeout_ms = 30000);

// The deterministic byte stream the backend and tests share: byte i = f(i).
void Pattern(uint64_t offset, char* out, size_t len);

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  void Update(const void* data, size_t len);
  std::string Hex();

 private:
  void* ctx_;
};

// Sends `bytes` of Pattern through `fd` while reading the same amount back (an echo backend
// behind it), both hashed; returns {sent hash, received hash, received bytes}.
struct EchoResult {
  std::string sent;
  std::string received;
  uint64_t received_bytes = 0;
};
EchoResult EchoTransfer(int fd, uint64_t bytes);

// Hex SHA-256 of Pattern(0..bytes).
std::string PatternHash(uint64_t bytes);

// A real OpenSSH sshd on 127.0.0.1 standing for the login node, with its files in `dir`/sshd.
// The test user (root) logs in with a key generated there; home() is the HOME the client side
// runs with, so known_hosts and identity files are the test's own.
class LoginSshd {
 public:
  explicit LoginSshd(const TempDir& dir);
  ~LoginSshd() { Stop(); }
  LoginSshd(const LoginSshd&) = delete;
  LoginSshd& operator=(const LoginSshd&) = delete;

  // A fresh host key (the login node "was reinstalled"); takes effect at the next Start().
  void NewHostKey();
  // sshd cannot listen on port 0 and say which port it got: StartOnFreePort picks one, and
  // another if it was taken before sshd bound it. port() is 0 until it started; a restart
  // keeps the port unless another process took it meanwhile.
  ::testing::AssertionResult Start();
  void Stop();

  int port() const { return port_; }
  // "127.0.0.1:PORT", for --via.
  std::string via() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string home() const { return dir_ + "/home"; }
  std::string Log() const;
  // SSH sessions sshd accepted so far.
  size_t Logins() const;

 private:
  std::string dir_;
  int port_;
  std::unique_ptr<Child> child_;
};

}  // namespace brokerproxy::testing

#endif  // BROKERPROXY_TESTS_E2E_HARNESS_H_
