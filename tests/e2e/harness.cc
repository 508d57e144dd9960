#include "e2e/harness.h"

#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/fsuid.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <dirent.h>
#include <ftw.h>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

namespace brokerproxy::testing {
namespace {

int64_t NowMs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000 + ts.tv_nsec / 1000000;
}

void SleepMs(int ms) {
  timespec ts{ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, nullptr);
}

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// In a forked child: become `uid` (with its primary group) if asked, then exec.
[[noreturn]] void ExecAs(const std::vector<std::string>& argv, const RunOptions& options) {
  if (options.uid) {
    gid_t gid = PrimaryGid(*options.uid);
    if (setgroups(0, nullptr) != 0 || setresgid(gid, gid, gid) != 0 ||
        setresuid(*options.uid, *options.uid, *options.uid) != 0) {
      _exit(126);
    }
  }
  for (const auto& e : options.env) putenv(const_cast<char*>(e.c_str()));
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  execvp(args[0], args.data());
  _exit(127);
}

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void SetTimeouts(int fd, int ms) {
  timeval tv{ms / 1000, (ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

// Tests write to sockets whose peers may be gone; that must be an error, not a dead test.
const bool kIgnoreSigpipe = [] {
  signal(SIGPIPE, SIG_IGN);
  return true;
}();

}  // namespace

std::string BinaryPath() { return BROKERPROXY_BINARY; }

// ---- files ----

TempDir::TempDir() {
  char tmpl[] = "/tmp/bp-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) std::abort();
  path_ = tmpl;
  chmod(path_.c_str(), 0711);
}

TempDir::~TempDir() {
  nftw(
      path_.c_str(),
      [](const char* p, const struct stat*, int, FTW*) { return ::remove(p) == 0 ? 0 : 0; }, 16,
      FTW_DEPTH | FTW_PHYS);
}

void WriteFile(const std::string& path, const std::string& data, int mode) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return;
  SendAll(fd, data);  // write(2) on a file via the same loop
  fchmod(fd, mode);
  close(fd);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ---- processes ----

std::ostream& operator<<(std::ostream& os, const RunResult& r) {
  return os << "exit " << r.exit_code << (r.timed_out ? " (timed out)" : "")
            << "\nstdout: " << r.out << "\nstderr: " << r.err;
}

RunResult RunCommand(const std::vector<std::string>& argv, const RunOptions& options) {
  RunResult result;
  int in[2], out[2], err[2];
  if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) return result;
  pid_t pid = fork();
  if (pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    ExecAs(argv, options);
  }
  close(in[0]);
  close(out[1]);
  close(err[1]);
  fcntl(in[1], F_SETFL, O_NONBLOCK);
  size_t stdin_off = 0;
  if (options.stdin_data.empty()) {
    close(in[1]);
    in[1] = -1;
  }
  int64_t deadline = NowMs() + options.timeout_ms;
  bool out_open = true, err_open = true;
  while (out_open || err_open || in[1] >= 0) {
    pollfd fds[3] = {{out_open ? out[0] : -1, POLLIN, 0},
                     {err_open ? err[0] : -1, POLLIN, 0},
                     {in[1], POLLOUT, 0}};
    int64_t left = deadline - NowMs();
    if (left <= 0) {
      result.timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    if (poll(fds, 3, static_cast<int>(left)) < 0 && errno != EINTR) break;
    char buf[65536];
    for (int i = 0; i < 2; ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = read(fds[i].fd, buf, sizeof(buf));
      if (n > 0) {
        (i == 0 ? result.out : result.err).append(buf, n);
      } else if (n == 0 || errno != EINTR) {
        (i == 0 ? out_open : err_open) = false;
      }
    }
    if (in[1] >= 0 && (fds[2].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t n = write(in[1], options.stdin_data.data() + stdin_off,
                        options.stdin_data.size() - stdin_off);
      if (n > 0) stdin_off += n;
      if (n < 0 || stdin_off == options.stdin_data.size()) {
        close(in[1]);
        in[1] = -1;
      }
    }
  }
  if (in[1] >= 0) close(in[1]);
  close(out[0]);
  close(err[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  result.exit_code = DecodeWaitStatus(status);
  return result;
}

std::unique_ptr<Child> Child::Spawn(const std::vector<std::string>& argv,
                                    const std::string& output_path, const RunOptions& options) {
  std::unique_ptr<Child> c(new Child());
  c->output_path_ = output_path;
  int fd = open(output_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return nullptr;
  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    ExecAs(argv, options);
  }
  close(fd);
  c->pid_ = pid;
  return c;
}

Child::~Child() {
  if (!status_ && pid_ > 0) Stop(SIGKILL, 5000);
}

std::optional<std::string> Child::WaitFor(const std::string& needle, int timeout_ms) {
  std::string out;
  size_t at = std::string::npos;
  WaitUntil(
      [&] {
        bool running = Running();  // first: output written before an exit is still read
        out = Output();
        at = out.find(needle);
        return at != std::string::npos || !running;
      },
      timeout_ms);
  if (at == std::string::npos) return std::nullopt;
  size_t start = out.rfind('\n', at);
  start = start == std::string::npos ? 0 : start + 1;
  size_t end = out.find('\n', at);
  return out.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

std::string Child::Output() const { return ReadFile(output_path_); }

bool Child::Running() {
  if (status_) return false;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    status_ = DecodeWaitStatus(status);
    return false;
  }
  return true;
}

int Child::Stop(int signum, int timeout_ms) {
  if (status_) return *status_;
  kill(pid_, signum);
  if (!WaitUntil([&] { return !Running(); }, timeout_ms)) {
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    status_ = DecodeWaitStatus(status);
  }
  return *status_;
}

// ---- daemon ----

namespace {

// A sanitizer report in a child's output fails the test that ran it.
void CheckForSanitizerReports(const std::string& output, const char* who) {
  for (const char* marker : {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"}) {
    if (output.find(marker) != std::string::npos) {
      ADD_FAILURE() << who << " reported a sanitizer error:\n" << output;
      return;
    }
  }
}

}  // namespace

Daemon::Daemon(const TempDir& dir, const std::string& extra_config, const std::string& proxy_extra)
    : dir_(dir.path()),
      config_path_(dir / "config.ini"),
      state_dir_(dir / "state"),
      socket_path_(dir / "control.sock"),
      log_path_(dir / "daemon.log") {
  WriteFile(config_path_, "[broker]\nstate_dir = " + state_dir_ + "\ncontrol_socket = " +
                              socket_path_ + "\nlog_level = info\n[proxy]\nlisten = 127.0.0.1:0\n" +
                              proxy_extra + "\n" + extra_config);
}

Daemon::~Daemon() {
  if (child_) Stop(SIGTERM);
}

::testing::AssertionResult Daemon::Start() {
  WriteFile(log_path_, "");  // a restart must not find the previous run's lines
  std::vector<std::string> argv = launcher_;
  for (const char* a : {"run", "-c"}) {
    if (argv.size() == launcher_.size()) argv.push_back(BinaryPath());
    argv.push_back(a);
  }
  argv.push_back(config_path_);
  child_ = Child::Spawn(argv, log_path_);
  if (!child_) return ::testing::AssertionFailure() << "cannot spawn the daemon";
  auto line = child_->WaitFor("brokerproxy started");
  if (!line) {
    std::string log = Log();
    child_->Stop(SIGKILL);
    child_.reset();
    return ::testing::AssertionFailure() << "daemon did not start:\n" << log;
  }
  // "proxy port 127.0.0.1:41234" (or "0.0.0.0:...", "[::]:..."): the first address's port.
  size_t at = line->find("proxy port ");
  if (at != std::string::npos) {
    std::string address = line->substr(at + 11);
    address = address.substr(0, address.find(' '));
    size_t colon = address.rfind(':');
    if (colon != std::string::npos) proxy_port_ = std::atoi(address.c_str() + colon + 1);
  }
  return ::testing::AssertionSuccess();
}

int Daemon::Stop(int signum) {
  if (!child_) return -1;
  int rc = child_->Stop(signum);
  child_.reset();
  CheckForSanitizerReports(Log(), "the daemon");
  return rc;
}

RunResult Daemon::Cli(std::vector<std::string> args, const RunOptions& options) const {
  // Right after the subcommand, so it stays before an exec-mode "--".
  args.insert(args.begin() + (args.empty() ? 0 : 1), {"-c", config_path_});
  args.insert(args.begin(), options.binary.empty() ? BinaryPath() : options.binary);
  RunResult r = RunCommand(args, options);
  CheckForSanitizerReports(r.err, "brokerproxy");
  return r;
}

std::string Daemon::SaveJob(const std::string& id, int backend_port, const std::string& type,
                            const RunOptions& options) const {
  RunResult r =
      Cli({"save", type, "--job-id", id, "--port", std::to_string(backend_port), "--format", "env"},
          options);
  if (r.exit_code != 0) return "";
  size_t at = r.out.find("BROKER_SECRET=");
  if (at == std::string::npos) return "";
  return r.out.substr(at + 14, r.out.find('\n', at) - at - 14);
}

bool Exited(pid_t pid) {
  std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  if (stat.empty()) return true;
  size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
}

pid_t Daemon::pid() const { return child_ ? child_->pid() : -1; }
std::string Daemon::Log() const { return ReadFile(log_path_); }

pid_t Daemon::Successor(size_t from) const {
  static const std::string kLine = "upgrade: process ";
  std::string log = Log();
  size_t at = log.find(kLine, from);
  if (at == std::string::npos) return -1;
  pid_t pid = std::atoi(log.c_str() + at + kLine.size());
  return pid > 0 ? pid : -1;
}

size_t Daemon::RssBytes() const {
  std::string status = ReadFile("/proc/" + std::to_string(pid()) + "/status");
  size_t at = status.find("VmRSS:");
  if (at == std::string::npos) return 0;
  return std::stoull(status.substr(at + 6)) * 1024;
}

int Daemon::OpenFds() const {
  std::string dir = "/proc/" + std::to_string(pid()) + "/fd";
  DIR* d = opendir(dir.c_str());
  if (!d) return -1;
  int n = 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  closedir(d);
  return n;
}

// ---- backend ----

namespace {

// A listening socket on 127.0.0.1 with a port of the kernel's choice; returns the fd and sets
// `*port`. Aborts on failure (a test cannot go on without it).
int ListenLoopback(int* port, std::optional<uid_t> owner = std::nullopt) {
  // The kernel records the creating thread's file-system uid as the socket's owner, which is
  // what the daemon's backend policy checks for a backend on its own host.
  int old_fsuid = owner ? setfsuid(*owner) : -1;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (owner) setfsuid(static_cast<uid_t>(old_fsuid));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(*port));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 1024) != 0) {
    std::abort();
  }
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  return fd;
}

}  // namespace

Backend::Backend(Options options) : options_(std::move(options)) {
  port_ = options_.port;
  listen_fd_ = ListenLoopback(&port_, options_.owner);
  acceptor_ = std::thread([this] { AcceptLoop(); });
}

FakeProxy::FakeProxy(size_t want_early, int wait_ms) {
  listen_fd_ = ListenLoopback(&port_);
  thread_ = std::thread([this, want_early, wait_ms] { Serve(want_early, wait_ms); });
}

void ExpectConnectSendsFirstBytesEarly(Child* connect, FakeProxy* fake,
                                       const std::string& preamble) {
  auto line = connect->WaitFor("listening on 127.0.0.1:", 30000);
  ASSERT_TRUE(line) << connect->Output();
  int fd = ConnectTcp(std::stoi(line->substr(line->find("127.0.0.1:") + 10)));
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "hello\n"));
  EXPECT_EQ(ReadLine(fd), "hello") << connect->Output();
  EXPECT_EQ(fake->BeforeReply(), preamble + "hello\n");
  ASSERT_TRUE(SendAll(fd, "and then\n"));  // the relay carries on from there
  EXPECT_EQ(ReadLine(fd), "and then");
  close(fd);
  EXPECT_EQ(connect->Stop(SIGTERM), 0) << connect->Output();
}

FakeProxy::~FakeProxy() {
  shutdown(listen_fd_, SHUT_RDWR);  // unblocks a pending accept
  thread_.join();
  close(listen_fd_);
}

std::string FakeProxy::BeforeReply() {
  std::lock_guard<std::mutex> lock(mu_);
  return replied_ ? before_reply_ : std::string();
}

void FakeProxy::Serve(size_t want_early, int wait_ms) {
  int fd = -1;
  std::string got;
  char buf[65536];
  while (got.empty()) {
    if (fd >= 0) close(fd);  // a probe: it sent nothing
    pollfd lp{listen_fd_, POLLIN, 0};
    if (poll(&lp, 1, 30000) != 1) return;
    fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
    for (;;) {
      size_t nl = got.find('\n');
      if (nl != std::string::npos && got.size() - nl - 1 >= want_early) break;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      pollfd p{fd, POLLIN, 0};
      if (left.count() <= 0 || poll(&p, 1, static_cast<int>(left.count())) != 1) break;
      ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      got.append(buf, n);
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    before_reply_ = got;
    replied_ = true;
  }
  size_t nl = got.find('\n');
  std::string reply = "OK\n" + (nl == std::string::npos ? std::string() : got.substr(nl + 1));
  if (SendAll(fd, reply)) {
    for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) {
      if (!SendAll(fd, buf, n)) break;
    }
  }
  shutdown(fd, SHUT_WR);
  close(fd);
}

Backend::~Backend() {
  stop_ = true;
  acceptor_.join();
  close(listen_fd_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : fds_) shutdown(fd, SHUT_RDWR);  // unblocks the workers
  }
  for (auto& t : workers_) t.join();
}

void Backend::AcceptLoop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    std::lock_guard<std::mutex> lock(mu_);
    fds_.push_back(fd);
    workers_.emplace_back([this, fd] { Serve(fd); });
  }
}

void Backend::Serve(int fd) {
  if (!options_.banner.empty()) SendAll(fd, options_.banner);
  std::string line;
  char c;
  bool counted = false;
  while (line.size() < 256 && recv(fd, &c, 1, 0) == 1) {
    if (!counted) connections_++;  // the first byte: not a readiness probe
    counted = true;
    if (c == '\n') break;
    line += c;
  }
  std::vector<char> buf(256 * 1024);
  if (line == "echo") {
    for (;;) {
      ssize_t n = recv(fd, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      if (!SendAll(fd, buf.data(), n)) break;
    }
    shutdown(fd, SHUT_WR);
  } else if (line == "upload") {
    Sha256 sha;
    uint64_t total = 0;
    for (;;) {
      ssize_t n = recv(fd, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      sha.Update(buf.data(), n);
      total += n;
    }
    SendAll(fd, sha.Hex() + " " + std::to_string(total) + "\n");
    shutdown(fd, SHUT_WR);
  } else if (line.rfind("download ", 0) == 0 || line.rfind("reset ", 0) == 0) {
    bool reset = line[0] == 'r';
    uint64_t n = std::stoull(line.substr(line.find(' ') + 1));
    for (uint64_t off = 0; off < n;) {
      size_t chunk = std::min<uint64_t>(buf.size(), n - off);
      Pattern(off, buf.data(), chunk);
      if (!SendAll(fd, buf.data(), chunk)) break;
      off += chunk;
      sent_ += chunk;
    }
    if (reset) {
      linger l{1, 0};
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    } else {
      shutdown(fd, SHUT_WR);
      // Wait for the peer's EOF so close() does not reset unread input.
      while (recv(fd, buf.data(), buf.size(), 0) > 0) {
      }
    }
  } else if (line == "slowread") {
    for (;;) {
      ssize_t n = recv(fd, buf.data(), 64 * 1024, 0);
      if (n <= 0) break;
      SleepMs(10);  // a slow reader on purpose: pacing, not a wait
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  close(fd);
  for (auto& f : fds_) {
    if (f == fd) f = -1;
  }
}

// ---- JSON output and ports ----

registry::JsonPtr ParseOut(const std::string& out) {
  auto j = registry::ParseJson(out, 1 << 20);
  return j.ok() ? std::move(j).value() : nullptr;
}

std::string JsonText(const cJSON* obj, std::initializer_list<const char*> path) {
  const cJSON* v = obj;
  for (const char* p : path) v = cJSON_GetObjectItemCaseSensitive(v, p);
  if (cJSON_IsString(v)) return v->valuestring;
  if (cJSON_IsNumber(v)) return std::to_string(static_cast<long long>(v->valuedouble));
  if (cJSON_IsBool(v)) return cJSON_IsTrue(v) ? "true" : "false";
  return "";
}

bool WaitUntil(const std::function<bool()>& pred, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    // The poll interval of the one condition wait every other wait in the tests goes through.
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  return pred();
}

uint64_t WaitUntilStill(const std::function<uint64_t()>& count, int timeout_ms) {
  std::optional<uint64_t> last;
  uint64_t now = 0;
  WaitUntil(
      [&] {
        now = count();
        bool still = last == now;
        last = now;
        return still;
      },
      timeout_ms);
  return now;
}

PortReservation::PortReservation() {
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ADD_FAILURE() << "cannot bind a loopback port: " << strerror(errno);
    Release();
    return;
  }
  port_ = ntohs(addr.sin_port);
}

int PortReservation::Listen(int backlog) {
  if (fd_ < 0 || listen(fd_, backlog) != 0) return -1;
  int fd = fd_;
  fd_ = -1;
  return fd;
}

void PortReservation::Release() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

PortStart WaitListening(std::unique_ptr<Child>* child, int port, std::string* why, size_t from,
                        const std::string& line, int timeout_ms) {
  if (!*child) {
    *why = "cannot spawn it";
    return PortStart::kFailed;
  }
  auto output = [&] {
    std::string out = (*child)->Output();
    return out.substr(std::min(from, out.size()));
  };
  auto in_use = [&] { return output().find("Address already in use") != std::string::npos; };
  bool listening = false;
  WaitUntil(
      [&] {
        if (!line.empty()) {
          listening = output().find(line) != std::string::npos;
        } else {
          int fd = ConnectTcp(port, "127.0.0.1", 1000);
          listening = fd >= 0;
          if (fd >= 0) close(fd);
        }
        return listening || in_use() || !(*child)->Running();
      },
      timeout_ms);
  if (listening && (*child)->Running()) return PortStart::kStarted;
  PortStart result = in_use() ? PortStart::kInUse : PortStart::kFailed;
  *why = (*child)->Running() ? "not listening on port " + std::to_string(port) + " in time:\n"
                             : "it exited:\n";
  *why += output();
  (*child)->Stop(SIGTERM, 5000);
  child->reset();
  return result;
}

::testing::AssertionResult StartOnFreePort(
    const std::function<PortStart(int port, std::string* why)>& start, int* port, int attempts) {
  std::string why;
  for (int attempt = 1; attempt <= attempts; ++attempt) {
    PortReservation reserved;
    int candidate = reserved.port();
    reserved.Release();  // the program binds it itself (not all of them set SO_REUSEADDR)
    why.clear();
    switch (start(candidate, &why)) {
      case PortStart::kStarted:
        *port = candidate;
        return ::testing::AssertionSuccess();
      case PortStart::kFailed:
        return ::testing::AssertionFailure()
               << "did not start on port " << candidate << ": " << why;
      case PortStart::kInUse:
        break;
    }
  }
  return ::testing::AssertionFailure()
         << "every one of " << attempts << " ports was taken before the program bound it: " << why;
}

// ---- other users ----

std::string ControlRequestAs(uid_t uid, const std::string& socket_path, const std::string& line) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return "";
  pid_t pid = fork();
  if (pid == 0) {
    size_t slash = socket_path.rfind('/');
    std::string dir = slash == std::string::npos ? "." : socket_path.substr(0, slash);
    std::string name = socket_path.substr(slash == std::string::npos ? 0 : slash + 1);
    gid_t gid = PrimaryGid(uid);
    if (chdir(dir.c_str()) != 0 || setgroups(0, nullptr) != 0 || setresgid(gid, gid, gid) != 0 ||
        setresuid(uid, uid, uid) != 0) {
      _exit(1);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    name.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
    SetTimeouts(fd, 10000);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) _exit(2);
    if (!SendAll(fd, line + "\n")) _exit(3);
    std::optional<std::string> reply = ReadLine(fd, 1 << 20);
    if (!reply || !SendAll(out[1], *reply)) _exit(4);
    _exit(0);
  }
  close(out[1]);
  std::string reply;
  char buf[4096];
  for (ssize_t n; (n = read(out[0], buf, sizeof(buf))) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    reply.append(buf, n);
  }
  close(out[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return reply;
}

std::optional<uid_t> TestUser(const std::string& name) {
  // useradd takes a lock on /etc/passwd and fails while another test process holds it, so a
  // concurrent creation of the same (or another) user is retried until the name resolves.
  for (int attempt = 0; attempt < 50; ++attempt) {
    if (const passwd* pw = getpwnam(name.c_str())) return pw->pw_uid;
    RunOptions o;
    o.timeout_ms = 20000;
    RunCommand({"useradd", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                "--home-dir", "/nonexistent", name},
               o);
    if (const passwd* pw = getpwnam(name.c_str())) return pw->pw_uid;
    usleep(100 * 1000);  // a retry backoff, not a wait for a condition
  }
  return std::nullopt;
}

gid_t PrimaryGid(uid_t uid) {
  const passwd* pw = getpwuid(uid);
  return pw != nullptr ? pw->pw_gid : static_cast<gid_t>(uid);
}

bool CanRunAs(uid_t uid) {
  RunOptions o;
  o.uid = uid;
  o.timeout_ms = 10000;
  return RunCommand({"/bin/true"}, o).exit_code == 0;
}

// ---- clients ----

int ConnectTcp(int port, const std::string& host, int timeout_ms) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  SetTimeouts(fd, timeout_ms);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

bool SendAll(int fd, const void* data, size_t len) {
  const char* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= n;
  }
  return true;
}

bool SendAll(int fd, const std::string& data) { return SendAll(fd, data.data(), data.size()); }

std::optional<std::string> ReadLine(int fd, size_t max) {
  std::string line;
  char c;
  while (line.size() < max) {
    ssize_t n = recv(fd, &c, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return std::nullopt;
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

std::string ReadToEof(int fd, size_t max) {
  std::string out;
  char buf[65536];
  while (out.size() < max) {
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, n);
  }
  return out;
}

void Pattern(uint64_t offset, char* out, size_t len) {
  for (size_t i = 0; i < len;) {
    uint64_t pos = offset + i;
    uint64_t word = SplitMix(pos / 8);
    size_t in_word = pos % 8;
    size_t take = std::min<size_t>(8 - in_word, len - i);
    std::memcpy(out + i, reinterpret_cast<const char*>(&word) + in_word, take);
    i += take;
  }
}

Sha256::Sha256() {
  auto* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  ctx_ = ctx;
}

Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }

void Sha256::Update(const void* data, size_t len) {
  EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), data, len);
}

std::string Sha256::Hex() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), digest, &len);
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += kHex[digest[i] >> 4];
    out += kHex[digest[i] & 15];
  }
  return out;
}

std::string PatternHash(uint64_t bytes) {
  Sha256 sha;
  std::vector<char> buf(1 << 20);
  for (uint64_t off = 0; off < bytes;) {
    size_t chunk = std::min<uint64_t>(buf.size(), bytes - off);
    Pattern(off, buf.data(), chunk);
    sha.Update(buf.data(), chunk);
    off += chunk;
  }
  return sha.Hex();
}

EchoResult EchoTransfer(int fd, uint64_t bytes) {
  EchoResult r;
  std::thread writer([&] {
    Sha256 sha;
    std::vector<char> buf(256 * 1024);
    for (uint64_t off = 0; off < bytes;) {
      size_t chunk = std::min<uint64_t>(buf.size(), bytes - off);
      Pattern(off, buf.data(), chunk);
      sha.Update(buf.data(), chunk);
      if (!SendAll(fd, buf.data(), chunk)) break;
      off += chunk;
    }
    shutdown(fd, SHUT_WR);
    r.sent = sha.Hex();
  });
  Sha256 sha;
  std::vector<char> buf(256 * 1024);
  for (;;) {
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    sha.Update(buf.data(), n);
    r.received_bytes += n;
  }
  writer.join();
  r.received = sha.Hex();
  return r;
}

// ---- denying proxy ----

DenyingProxy::DenyingProxy() {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(fd_, 16) != 0 || ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return;
  }
  port_ = ntohs(addr.sin_port);
  thread_ = std::thread([this] {
    for (;;) {
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) return;  // shut down
      if (ReadLine(c, 8192).value_or("").starts_with("BROKER1 ")) {
        ++handshakes_;
        SendAll(c, "ERR denied\n");
      }
      ::close(c);
    }
  });
}

DenyingProxy::~DenyingProxy() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) ::close(fd_);
}

int PendingOnUnixSocket(const std::string& path) {
  RunResult ss = RunCommand({"ss", "-xlnH", "src", path});
  std::istringstream in(ss.out);
  std::string netid, state;
  int queued = -1;
  if (ss.exit_code != 0 || !(in >> netid >> state >> queued)) return -1;
  return queued;
}

LoginSshd::LoginSshd(const TempDir& dir) : dir_(dir / "sshd"), port_(0) {
  ::mkdir(dir_.c_str(), 0700);
  ::mkdir(home().c_str(), 0700);
  ::mkdir((home() + "/.ssh").c_str(), 0700);
  ::mkdir("/run/sshd", 0755);  // privilege separation directory
  RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f",
              home() + "/.ssh/id_ed25519"});
  WriteFile(dir_ + "/authorized_keys", ReadFile(home() + "/.ssh/id_ed25519.pub"), 0600);
  NewHostKey();
  WriteFile(dir_ + "/sshd_config",
            "ListenAddress 127.0.0.1\nHostKey " + dir_ +
                "/host_key\nPidFile none\nUsePAM no\nStrictModes no\n"
                "AuthorizedKeysFile " +
                dir_ +
                "/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "AllowTcpForwarding yes\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n");
}

void LoginSshd::NewHostKey() {
  ::unlink((dir_ + "/host_key").c_str());
  ::unlink((dir_ + "/host_key.pub").c_str());
  RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", dir_ + "/host_key"});
}

::testing::AssertionResult LoginSshd::Start() {
  auto start = [this](int port, std::string* why) {
    // The log grows over restarts: only what this start wrote counts.
    size_t before = Log().size();
    child_ = Child::Spawn(
        {"/usr/sbin/sshd", "-D", "-e", "-f", dir_ + "/sshd_config", "-p", std::to_string(port)},
        dir_ + "/sshd.log");
    return WaitListening(&child_, port, why, before,
                         "Server listening on 127.0.0.1 port " + std::to_string(port) + ".");
  };
  // A restart keeps the port (known_hosts names the host by it) unless it was taken meanwhile.
  if (port_ != 0) {
    std::string why;
    PortStart again = start(port_, &why);
    if (again == PortStart::kStarted) return ::testing::AssertionSuccess();
    if (again == PortStart::kFailed) {
      return ::testing::AssertionFailure() << "sshd did not start again: " << why;
    }
  }
  return StartOnFreePort(start, &port_);
}

void LoginSshd::Stop() {
  if (child_) child_->Stop(SIGTERM, 5000);
  child_.reset();
}

std::string LoginSshd::Log() const { return ReadFile(dir_ + "/sshd.log"); }

size_t LoginSshd::Logins() const {
  std::string log = Log();
  size_t n = 0;
  for (size_t at = log.find("Accepted publickey"); at != std::string::npos;
       at = log.find("Accepted publickey", at + 1)) {
    ++n;
  }
  return n;
}

}  // namespace brokerproxy::testing
