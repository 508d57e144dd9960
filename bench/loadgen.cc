// brokerproxy_loadgen: the load generator of bench/e2e.sh. One process, one thread, plain
// epoll; it depends on nothing of brokerproxy, so it measures the daemon and its peers (socat,
// HAProxy, ssh -L, a direct connection) with the same client and the same backend.
//
// Backends (print {"mode":...,"listen":"127.0.0.1:PORT"} once listening; run until SIGTERM):
//   serve  --listen H:P   what e2e.sh uses: each connection picks its behaviour by its first
//                         bytes. "U <n>\n" followed by n bytes: the bytes are read (and sampled
//                         against the pattern), then "<n>\n" is answered. "D <n>\n": n pattern
//                         bytes are sent. Requests repeat on one connection. Any other first
//                         byte: the connection echoes everything.
//   sink   --listen H:P   reads and discards.
//   source --listen H:P   sends pattern bytes for ever.
//   echo   --listen H:P   echoes.
//
// Clients (print one JSON object on stdout; every connection optionally starts with the plain
// preamble, --preamble "BROKER1 <job> <secret>" or --preamble-file F, and then requires "OK\n"):
//   throughput --connect H:P --streams N --bytes B --direction up|down --seconds S
//       N connections to a `serve` backend, each repeating transfers of B bytes (U or D
//       requests) until S seconds have passed; a transfer counts once the backend acknowledged
//       it (up) or all B bytes arrived (down). Reports Gbit/s over the completed transfers.
//   handshake --connect H:P --concurrency C --seconds S
//       C connections in flight; each is connect -> (preamble -> "OK\n") -> one byte written ->
//       the echoed byte read -> close. Reports connections/s and latency percentiles (from
//       socket() to the echoed byte).
//   idle --connect H:P --count K [--parallel P] [--stdin]
//       opens K sessions (each verified by a one-byte echo), prints when all are established,
//       then holds them until SIGTERM/SIGINT (or EOF on stdin with --stdin).
//   slowread --connect H:P [--streams N] [--chunk 65536] [--interval-ms 10] --seconds S
//       asks a `serve` backend for an endless download and reads `chunk` bytes per stream every
//       interval: a slow reader, to measure what a proxy buffers for it.
//
// The payload is a fixed pattern with a prime period (kPatternPeriod), so lost, duplicated or
// reordered bytes show up when a read is compared with it. Every 16th read is compared.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace brokerproxy::bench {
namespace {

// ---- Small utilities ----

constexpr size_t kPatternPeriod = 65521;  // prime: no chunk size is a multiple of it
constexpr size_t kMaxIo = 256 * 1024;     // largest single read or write
constexpr int kVerifyEvery = 16;          // compare one read in this many with the pattern

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

[[noreturn]] void Die(const char* fmt, const char* arg = "") {
  std::fprintf(stderr, "brokerproxy_loadgen: ");
  std::fprintf(stderr, fmt, arg);
  std::fprintf(stderr, "\n");
  std::exit(2);
}

// The payload: byte k of a stream is Pattern()[k % kPatternPeriod]. The buffer is one period
// plus kMaxIo long, so any offset can be written or compared in one call.
const char* Pattern() {
  static const std::vector<char> pattern = [] {
    std::vector<char> p(kPatternPeriod + kMaxIo);
    for (size_t i = 0; i < p.size(); ++i) {
      size_t j = i % kPatternPeriod;
      p[i] = static_cast<char>((j * 7 + (j >> 8)) & 0xff);
    }
    return p;
  }();
  return pattern.data();
}

bool MatchesPattern(const char* data, size_t n, uint64_t offset) {
  return std::memcmp(data, Pattern() + offset % kPatternPeriod, n) == 0;
}

// "127.0.0.1:7000" or "localhost:7000" (IPv4 only: everything here is on loopback).
sockaddr_in ParseEndpoint(const std::string& text) {
  size_t colon = text.rfind(':');
  if (colon == std::string::npos) Die("bad address '%s' (want host:port)", text.c_str());
  std::string host = text.substr(0, colon);
  if (host == "localhost" || host.empty()) host = "127.0.0.1";
  sockaddr_in a{};
  a.sin_family = AF_INET;
  char* end = nullptr;
  long port = std::strtol(text.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || port < 0 || port > 65535 ||
      inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1) {
    Die("bad address '%s' (want IPv4:port)", text.c_str());
  }
  a.sin_port = htons(static_cast<uint16_t>(port));
  return a;
}

std::string FormatEndpoint(const sockaddr_in& a) {
  char buf[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &a.sin_addr, buf, sizeof(buf));
  return std::string(buf) + ":" + std::to_string(ntohs(a.sin_port));
}

void SetNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Command-line flags: "--name value" pairs and bare "--name" switches.
class Flags {
 public:
  Flags(int argc, char** argv) {
    for (int i = 2; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) Die("unexpected argument '%s'", argv[i]);
      a = a.substr(2);
      if (i + 1 < argc && std::string_view(argv[i + 1]).rfind("--", 0) != 0) {
        values_[a] = argv[++i];
      } else {
        values_[a] = "";
      }
    }
  }
  bool Has(const std::string& name) const { return values_.count(name) != 0; }
  std::string Get(const std::string& name, const std::string& def = "") {
    used_.push_back(name);
    auto it = values_.find(name);
    return it == values_.end() ? def : it->second;
  }
  std::string Require(const std::string& name) {
    if (!Has(name)) Die("missing --%s", name.c_str());
    return Get(name);
  }
  // Accepts K, M, G suffixes (powers of 1024) for sizes.
  uint64_t GetSize(const std::string& name, uint64_t def) {
    std::string v = Get(name);
    if (v.empty()) return def;
    char* end = nullptr;
    double x = std::strtod(v.c_str(), &end);
    std::string unit = end;
    if (unit == "K" || unit == "KiB" || unit == "k") x *= 1024;
    if (unit == "M" || unit == "MiB") x *= 1024 * 1024;
    if (unit == "G" || unit == "GiB") x *= 1024.0 * 1024 * 1024;
    if (x < 0) Die("--%s must not be negative", name.c_str());
    return static_cast<uint64_t>(x);
  }
  double GetDouble(const std::string& name, double def) {
    std::string v = Get(name);
    return v.empty() ? def : std::strtod(v.c_str(), nullptr);
  }
  void CheckAllUsed() const {
    for (const auto& [k, v] : values_) {
      if (std::find(used_.begin(), used_.end(), k) == used_.end())
        Die("unknown flag --%s", k.c_str());
    }
  }

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> used_;
};

// ---- Event loop ----

class Handler {
 public:
  virtual ~Handler() = default;
  virtual void OnEvent(uint32_t events) = 0;
};

class Poller {
 public:
  Poller() : ep_(epoll_create1(EPOLL_CLOEXEC)) {
    if (ep_ < 0) Die("epoll_create1: %s", std::strerror(errno));
  }
  ~Poller() { close(ep_); }
  void Add(int fd, uint32_t events, Handler* h) { Ctl(EPOLL_CTL_ADD, fd, events, h); }
  void Mod(int fd, uint32_t events, Handler* h) { Ctl(EPOLL_CTL_MOD, fd, events, h); }
  void Del(int fd) { epoll_ctl(ep_, EPOLL_CTL_DEL, fd, nullptr); }
  // Dispatches ready events; handlers may only schedule their own deletion (Retire).
  void Wait(int timeout_ms) {
    epoll_event evs[256];
    int n = epoll_wait(ep_, evs, 256, timeout_ms);
    if (n < 0 && errno != EINTR) Die("epoll_wait: %s", std::strerror(errno));
    for (int i = 0; i < n; ++i) {
      auto* h = static_cast<Handler*>(evs[i].data.ptr);
      if (std::find(dead_.begin(), dead_.end(), h) != dead_.end()) continue;
      h->OnEvent(evs[i].events);
    }
    for (Handler* h : dead_) delete h;
    dead_.clear();
  }
  // Deletes `h` after the current batch of events (it may still have one queued).
  void Retire(Handler* h) { dead_.push_back(h); }

 private:
  void Ctl(int op, int fd, uint32_t events, Handler* h) {
    epoll_event ev{};
    ev.events = events;
    ev.data.ptr = h;
    if (epoll_ctl(ep_, op, fd, &ev) != 0) Die("epoll_ctl: %s", std::strerror(errno));
  }
  int ep_;
  std::vector<Handler*> dead_;
};

// SIGTERM/SIGINT (and, optionally, EOF on stdin) as events.
class StopWatch : public Handler {
 public:
  StopWatch(Poller* poller, bool watch_stdin) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, nullptr);
    sfd_ = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd_ < 0) Die("signalfd: %s", std::strerror(errno));
    poller->Add(sfd_, EPOLLIN, this);
    if (watch_stdin) {
      stdin_ = std::make_unique<StdinWatch>(this);
      poller->Add(0, EPOLLIN, stdin_.get());
    }
  }
  bool stopped() const { return stopped_; }
  void OnEvent(uint32_t) override { stopped_ = true; }

 private:
  struct StdinWatch : Handler {
    explicit StdinWatch(StopWatch* w) : watch(w) {}
    void OnEvent(uint32_t) override {
      char buf[256];
      ssize_t n = read(0, buf, sizeof(buf));
      if (n <= 0) watch->stopped_ = true;
    }
    StopWatch* watch;
  };
  int sfd_ = -1;
  bool stopped_ = false;
  std::unique_ptr<StdinWatch> stdin_;
};

// ---- Backends ----

enum class Behavior { kServe, kSink, kSource, kEcho };

struct ServerStats {
  uint64_t accepted = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint64_t pattern_errors = 0;
  uint64_t protocol_errors = 0;
};

class ServerConn : public Handler {
 public:
  ServerConn(Poller* poller, int fd, Behavior b, ServerStats* stats)
      : poller_(poller), fd_(fd), stats_(stats) {
    switch (b) {
      case Behavior::kServe:
        state_ = State::kFirst;
        break;
      case Behavior::kSink:
        state_ = State::kSink;
        break;
      case Behavior::kSource:
        state_ = State::kSource;
        break;
      case Behavior::kEcho:
        state_ = State::kEcho;
        break;
    }
    interest_ = Interest();
    poller_->Add(fd_, interest_, this);
  }

  void OnEvent(uint32_t ev) override {
    if (closed_) return;
    if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !OnReadable()) return Close();
    if ((ev & EPOLLOUT) && !OnWritable()) return Close();
    uint32_t want = Interest();
    if (want != interest_) {
      interest_ = want;
      poller_->Mod(fd_, interest_, this);
    }
  }

 private:
  enum class State { kFirst, kRequest, kUpBody, kDownBody, kEcho, kSink, kSource };

  uint32_t Interest() const {
    uint32_t ev = 0;
    if (state_ != State::kEcho || out_.size() < kMaxIo) ev |= EPOLLIN;
    if (!out_.empty() || state_ == State::kDownBody || state_ == State::kSource) ev |= EPOLLOUT;
    return ev;
  }

  void Close() {
    closed_ = true;
    poller_->Del(fd_);
    close(fd_);
    poller_->Retire(this);
  }

  // False when the connection is over (EOF, error, protocol violation).
  bool OnReadable() {
    char buf[kMaxIo];
    for (int round = 0; round < 16; ++round) {
      size_t want = sizeof(buf);
      if (state_ == State::kUpBody) want = std::min<uint64_t>(want, remaining_);
      if (state_ == State::kFirst || state_ == State::kRequest) want = 4096;
      if (state_ == State::kEcho && out_.size() >= kMaxIo) return true;
      ssize_t n = read(fd_, buf, want);
      if (n == 0) return false;
      if (n < 0) return errno == EAGAIN || errno == EINTR;
      stats_->bytes_in += static_cast<uint64_t>(n);
      switch (state_) {
        case State::kSink:
        case State::kSource:
          break;
        case State::kEcho:
          out_.append(buf, static_cast<size_t>(n));
          if (!Flush()) return false;
          break;
        case State::kFirst:
        case State::kRequest:
          in_.append(buf, static_cast<size_t>(n));
          if (!Process()) return false;
          break;
        case State::kUpBody:
          if (!TakeBody(buf, static_cast<size_t>(n))) return false;
          break;
        case State::kDownBody:
          ++stats_->protocol_errors;  // the client must wait for its download
          return false;
      }
    }
    return true;
  }

  bool TakeBody(const char* data, size_t n) {
    if (++reads_ % kVerifyEvery == 0 && !MatchesPattern(data, n, done_)) ++stats_->pattern_errors;
    done_ += n;
    remaining_ -= n;
    if (remaining_ == 0) {
      out_ += std::to_string(done_) + "\n";
      state_ = State::kRequest;
      return Flush();
    }
    return true;
  }

  // Handles buffered request lines (and body bytes that came with them).
  bool Process() {
    while (!in_.empty()) {
      if (state_ == State::kFirst) {
        if (in_[0] != 'U' && in_[0] != 'D') {
          state_ = State::kEcho;
          out_.swap(in_);
          in_.clear();
          return Flush();
        }
        state_ = State::kRequest;
      }
      if (state_ != State::kRequest) return true;
      size_t nl = in_.find('\n');
      if (nl == std::string::npos) {
        if (in_.size() > 64) {
          ++stats_->protocol_errors;
          return false;
        }
        return true;
      }
      char kind = in_[0];
      char* end = nullptr;
      unsigned long long n = std::strtoull(in_.c_str() + 1, &end, 10);
      if ((kind != 'U' && kind != 'D') || end != in_.c_str() + nl || n == 0) {
        ++stats_->protocol_errors;
        return false;
      }
      in_.erase(0, nl + 1);
      remaining_ = n;
      done_ = 0;
      reads_ = 0;
      if (kind == 'D') {
        state_ = State::kDownBody;
        if (!in_.empty()) {
          ++stats_->protocol_errors;
          return false;
        }
        return true;
      }
      state_ = State::kUpBody;
      size_t take = std::min<uint64_t>(in_.size(), remaining_);
      std::string body = in_.substr(0, take);
      in_.erase(0, take);
      if (take > 0 && !TakeBody(body.data(), body.size())) return false;
    }
    return true;
  }

  bool Flush() {
    while (!out_.empty()) {
      ssize_t n = send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL);
      if (n < 0) return errno == EAGAIN || errno == EINTR;
      stats_->bytes_out += static_cast<uint64_t>(n);
      out_.erase(0, static_cast<size_t>(n));
    }
    return true;
  }

  bool OnWritable() {
    if (!Flush()) return false;
    if (!out_.empty()) return true;
    for (int round = 0; round < 16; ++round) {
      if (state_ != State::kDownBody && state_ != State::kSource) break;
      size_t want = kMaxIo;
      if (state_ == State::kDownBody) want = std::min<uint64_t>(want, remaining_);
      ssize_t n = send(fd_, Pattern() + done_ % kPatternPeriod, want, MSG_NOSIGNAL);
      if (n < 0) return errno == EAGAIN || errno == EINTR;
      stats_->bytes_out += static_cast<uint64_t>(n);
      done_ += static_cast<uint64_t>(n);
      if (state_ == State::kDownBody) {
        remaining_ -= static_cast<uint64_t>(n);
        if (remaining_ == 0) {
          state_ = State::kRequest;
          return Process();
        }
      }
    }
    return true;
  }

  Poller* poller_;
  int fd_;
  ServerStats* stats_;
  State state_;
  uint32_t interest_ = 0;
  bool closed_ = false;
  std::string in_;
  std::string out_;
  uint64_t remaining_ = 0;
  uint64_t done_ = 0;
  uint64_t reads_ = 0;
};

class Server : public Handler {
 public:
  Server(Poller* poller, const sockaddr_in& addr, Behavior b) : poller_(poller), behavior_(b) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
      Die("bind %s", (FormatEndpoint(addr) + ": " + std::strerror(errno)).c_str());
    }
    if (listen(fd_, 4096) != 0) Die("listen: %s", std::strerror(errno));
    socklen_t len = sizeof(bound_);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&bound_), &len);
    poller_->Add(fd_, EPOLLIN, this);
  }
  const sockaddr_in& bound() const { return bound_; }
  const ServerStats& stats() const { return stats_; }

  void OnEvent(uint32_t) override {
    for (int i = 0; i < 256; ++i) {
      int c = accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0) {
        if (errno == EMFILE || errno == ENFILE)
          std::fprintf(stderr, "loadgen: accept: out of fds\n");
        return;
      }
      SetNoDelay(c);
      ++stats_.accepted;
      new ServerConn(poller_, c, behavior_, &stats_);  // owned by the poller from now on
    }
  }

 private:
  Poller* poller_;
  Behavior behavior_;
  int fd_ = -1;
  sockaddr_in bound_{};
  ServerStats stats_;
};

int RunServer(const char* mode, Flags& flags) {
  Behavior b = Behavior::kServe;
  if (std::strcmp(mode, "sink") == 0) b = Behavior::kSink;
  if (std::strcmp(mode, "source") == 0) b = Behavior::kSource;
  if (std::strcmp(mode, "echo") == 0) b = Behavior::kEcho;
  sockaddr_in addr = ParseEndpoint(flags.Get("listen", "127.0.0.1:0"));
  flags.CheckAllUsed();
  signal(SIGPIPE, SIG_IGN);
  Poller poller;
  StopWatch stop(&poller, false);
  Server server(&poller, addr, b);
  std::printf("{\"mode\":\"%s\",\"listen\":\"%s\"}\n", mode,
              FormatEndpoint(server.bound()).c_str());
  std::fflush(stdout);
  while (!stop.stopped()) poller.Wait(-1);
  const ServerStats& s = server.stats();
  std::fprintf(stderr,
               "{\"mode\":\"%s\",\"accepted\":%" PRIu64 ",\"bytes_in\":%" PRIu64
               ",\"bytes_out\":%" PRIu64 ",\"pattern_errors\":%" PRIu64
               ",\"protocol_errors\":%" PRIu64 "}\n",
               mode, s.accepted, s.bytes_in, s.bytes_out, s.pattern_errors, s.protocol_errors);
  return 0;
}

// ---- Clients ----

struct ClientOptions {
  sockaddr_in target{};
  std::string preamble;  // with its newline; empty: none
  // handshake --pipeline: the probe byte goes in the same write as the preamble, as the
  // protocol allows (the proxy keeps bytes sent before its OK), instead of after the OK.
  bool pipeline = false;
};

ClientOptions ReadClientOptions(Flags& flags) {
  ClientOptions o;
  o.target = ParseEndpoint(flags.Require("connect"));
  std::string p = flags.Get("preamble");
  std::string file = flags.Get("preamble-file");
  if (!file.empty()) {
    FILE* f = std::fopen(file.c_str(), "r");
    if (!f) Die("cannot read %s", file.c_str());
    char line[4096];
    if (!std::fgets(line, sizeof(line), f)) Die("empty preamble file %s", file.c_str());
    std::fclose(f);
    p = line;
  }
  while (!p.empty() && (p.back() == '\n' || p.back() == '\r')) p.pop_back();
  if (!p.empty()) o.preamble = p + "\n";
  return o;
}

// Counts failures by reason for the JSON report.
class Errors {
 public:
  void Add(const std::string& why) { ++counts_[why]; }
  uint64_t total() const {
    uint64_t t = 0;
    for (const auto& [k, v] : counts_) t += v;
    return t;
  }
  std::string Json() const {
    std::string s = "{";
    for (const auto& [k, v] : counts_) {
      if (s.size() > 1) s += ",";
      s += "\"" + k + "\":" + std::to_string(v);
    }
    return s + "}";
  }

 private:
  std::map<std::string, uint64_t> counts_;
};

// A client connection: connect, then the optional preamble and its "OK\n". Subclasses take over
// in OnReady() and OnData(). A `self_owned` connection is deleted by the poller once closed;
// otherwise its run owns it and may still query it after Close().
class ClientConn : public Handler {
 public:
  ClientConn(Poller* poller, const ClientOptions* opts, bool self_owned)
      : poller_(poller), opts_(opts), self_owned_(self_owned) {}

  // Starts connecting. False (and the reason in *why) if that failed at once.
  bool Begin(std::string* why) {
    started_ns_ = NowNs();
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd_ < 0) {
      *why = std::string("socket: ") + std::strerror(errno);
      return false;
    }
    SetNoDelay(fd_);
    int rc = connect(fd_, reinterpret_cast<const sockaddr*>(&opts_->target), sizeof(opts_->target));
    if (rc != 0 && errno != EINPROGRESS) {
      *why = std::string("connect: ") + std::strerror(errno);
      close(fd_);
      fd_ = -1;
      return false;
    }
    phase_ = Phase::kConnecting;
    interest_ = EPOLLOUT;
    poller_->Add(fd_, interest_, this);
    return true;
  }

  void OnEvent(uint32_t ev) override {
    if (closed_) return;
    switch (phase_) {
      case Phase::kConnecting: {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0 || (ev & EPOLLERR)) {
          return Fail(std::string("connect: ") + std::strerror(err ? err : ECONNREFUSED));
        }
        if (opts_->preamble.empty()) {
          phase_ = Phase::kReady;
          return OnReady();
        }
        std::string first = opts_->preamble + (opts_->pipeline ? "x" : "");
        ssize_t n = send(fd_, first.data(), first.size(), MSG_NOSIGNAL);
        if (n != static_cast<ssize_t>(first.size())) return Fail("preamble: short write");
        phase_ = Phase::kAwaitOk;
        SetInterest(EPOLLIN);
        return;
      }
      case Phase::kAwaitOk: {
        char buf[64];
        ssize_t n = read(fd_, buf, sizeof(buf));
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0)
          return Fail(line_.empty() ? "closed before OK" : "closed after " + Printable(line_));
        line_.append(buf, static_cast<size_t>(n));
        size_t nl = line_.find('\n');
        if (nl == std::string::npos) {
          if (line_.size() > 32) return Fail("no newline in the reply");
          return;
        }
        if (line_.compare(0, nl + 1, "OK\n") != 0) return Fail(Printable(line_.substr(0, nl + 1)));
        early_ = line_.substr(nl + 1);
        if (!early_.empty() && !opts_->pipeline) return Fail("bytes after OK");
        phase_ = Phase::kReady;
        return OnReady();
      }
      case Phase::kReady:
        return OnData(ev);
      case Phase::kIdle:
        return;
    }
  }

  uint64_t started_ns() const { return started_ns_; }

 protected:
  // Bytes that arrived with the OK (only when pipelining).
  std::string early_;
  virtual void OnReady() = 0;
  virtual void OnData(uint32_t ev) = 0;
  // The connection failed: report and Close().
  virtual void Fail(const std::string& why) = 0;

  static std::string Printable(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    for (char& c : s) {
      if (c < 32 || c > 126 || c == '"' || c == '\\') c = '?';
    }
    return "reply '" + s + "'";
  }

  void SetInterest(uint32_t ev) {
    if (ev == interest_) return;
    interest_ = ev;
    poller_->Mod(fd_, ev, this);
  }
  void Close() {
    if (closed_) return;
    closed_ = true;
    if (fd_ >= 0) {
      poller_->Del(fd_);
      close(fd_);
    }
    if (self_owned_) poller_->Retire(this);
  }

  enum class Phase { kIdle, kConnecting, kAwaitOk, kReady };
  Poller* poller_;
  const ClientOptions* opts_;
  bool self_owned_;
  int fd_ = -1;
  Phase phase_ = Phase::kIdle;
  uint32_t interest_ = 0;
  bool closed_ = false;
  uint64_t started_ns_ = 0;
  std::string line_;
};

// -- throughput --

class ThroughputRun;

class StreamConn : public ClientConn {
 public:
  StreamConn(Poller* p, const ClientOptions* o, ThroughputRun* run)
      : ClientConn(p, o, /*self_owned=*/false), run_(run) {}
  // Starts the next transfer of `bytes`, up (client to backend) or down.
  void StartTransfer(uint64_t bytes, bool up);
  void Abort() { Close(); }

 protected:
  void OnReady() override;
  void OnData(uint32_t ev) override;
  void Fail(const std::string& why) override;

 private:
  bool SendBody();
  ThroughputRun* run_;
  bool up_ = true;
  uint64_t total_ = 0;  // bytes of this transfer
  uint64_t done_ = 0;   // sent (up) or received (down)
  uint64_t reads_ = 0;
  std::string out_;  // the request line
  std::string ack_;
};

class ThroughputRun {
 public:
  ThroughputRun(Flags& flags) : opts_(ReadClientOptions(flags)) {
    streams_ = static_cast<int>(flags.GetSize("streams", 1));
    bytes_ = flags.GetSize("bytes", 64u << 20);
    std::string dir = flags.Get("direction", "up");
    if (dir != "up" && dir != "down") Die("--direction must be up or down, not '%s'", dir.c_str());
    up_ = dir == "up";
    seconds_ = flags.GetDouble("seconds", 3);
    flags.CheckAllUsed();
    if (streams_ < 1 || bytes_ == 0) Die("--streams and --bytes must be positive");
  }

  int Run() {
    uint64_t deadline = NowNs() + static_cast<uint64_t>((seconds_ + 30) * 1e9);
    for (int i = 0; i < streams_; ++i) {
      conns_.push_back(std::make_unique<StreamConn>(&poller_, &opts_, this));
      std::string why;
      if (!conns_.back()->Begin(&why)) {
        errors_.Add(why);
        return Report(false);
      }
    }
    while (active_ + finished_ < streams_ && errors_.total() == 0 && NowNs() < deadline)
      poller_.Wait(100);
    if (errors_.total() != 0 || NowNs() >= deadline) return Report(false);
    // Every stream is connected (and past its preamble): measure from here.
    start_ns_ = NowNs();
    cpu_start_ = CpuSeconds();
    stop_ns_ = start_ns_ + static_cast<uint64_t>(seconds_ * 1e9);
    for (auto& c : conns_) c->StartTransfer(bytes_, up_);
    while (finished_ < streams_ && errors_.total() == 0 && NowNs() < deadline) poller_.Wait(100);
    end_ns_ = NowNs();
    bool ok = finished_ == streams_ && errors_.total() == 0;
    if (!ok && errors_.total() == 0) errors_.Add("stalled: transfers did not finish");
    return Report(ok);
  }

  // Callbacks from the streams.
  void Ready() { ++active_; }
  void TransferDone(StreamConn* c, uint64_t bytes) {
    total_bytes_ += bytes;
    ++transfers_;
    if (NowNs() < stop_ns_) {
      c->StartTransfer(bytes_, up_);
    } else {
      ++finished_;
      c->Abort();
    }
  }
  void Error(const std::string& why) { errors_.Add(why); }
  void PatternError() { ++pattern_errors_; }

 private:
  int Report(bool ok) {
    for (auto& c : conns_) c->Abort();
    double secs = end_ns_ > start_ns_ ? static_cast<double>(end_ns_ - start_ns_) / 1e9 : 0;
    double gbit = secs > 0 ? static_cast<double>(total_bytes_) * 8 / secs / 1e9 : 0;
    std::printf(
        "{\"mode\":\"throughput\",\"ok\":%s,\"target\":\"%s\",\"preamble\":%s,\"direction\":\"%s\","
        "\"streams\":%d,\"transfer_bytes\":%" PRIu64 ",\"transfers\":%" PRIu64
        ",\"total_bytes\":%" PRIu64
        ",\"seconds\":%.3f,\"gbit_per_s\":%.3f,\"mbyte_per_s\":%.1f,"
        "\"client_cpu_s\":%.3f,\"pattern_errors\":%" PRIu64 ",\"errors\":%s}\n",
        ok && pattern_errors_ == 0 ? "true" : "false", FormatEndpoint(opts_.target).c_str(),
        opts_.preamble.empty() ? "false" : "true", up_ ? "up" : "down", streams_, bytes_,
        transfers_, total_bytes_, secs, gbit, static_cast<double>(total_bytes_) / secs / 1e6,
        CpuSeconds() - cpu_start_, pattern_errors_, errors_.Json().c_str());
    return ok && pattern_errors_ == 0 ? 0 : 1;
  }

  ClientOptions opts_;
  Poller poller_;  // declared before the connections, which unregister from it
  int streams_ = 1;
  uint64_t bytes_ = 0;
  bool up_ = true;
  double seconds_ = 3;
  std::vector<std::unique_ptr<StreamConn>> conns_;
  int active_ = 0;
  int finished_ = 0;
  uint64_t start_ns_ = 0, stop_ns_ = 0, end_ns_ = 0;
  double cpu_start_ = 0;
  uint64_t total_bytes_ = 0;
  uint64_t transfers_ = 0;
  uint64_t pattern_errors_ = 0;
  Errors errors_;
};

void StreamConn::OnReady() {
  SetInterest(0);
  run_->Ready();
}

void StreamConn::Fail(const std::string& why) {
  run_->Error(why);
  Close();
}

void StreamConn::StartTransfer(uint64_t bytes, bool up) {
  if (closed_) return;
  up_ = up;
  total_ = bytes;
  done_ = 0;
  reads_ = 0;
  ack_.clear();
  out_ = std::string(up ? "U " : "D ") + std::to_string(bytes) + "\n";
  SetInterest(EPOLLOUT | EPOLLIN);
}

bool StreamConn::SendBody() {
  while (!out_.empty()) {
    ssize_t n = send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN) return true;
      Fail(std::string("send: ") + std::strerror(errno));
      return false;
    }
    out_.erase(0, static_cast<size_t>(n));
  }
  while (up_ && done_ < total_) {
    size_t want = std::min<uint64_t>(kMaxIo, total_ - done_);
    ssize_t n = send(fd_, Pattern() + done_ % kPatternPeriod, want, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN) return true;
      Fail(std::string("send: ") + std::strerror(errno));
      return false;
    }
    done_ += static_cast<uint64_t>(n);
  }
  return true;
}

void StreamConn::OnData(uint32_t ev) {
  if (ev & EPOLLOUT) {
    if (!SendBody()) return;
    if (out_.empty() && (!up_ || done_ == total_)) SetInterest(EPOLLIN);
  }
  if (!(ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
  static thread_local char buf[kMaxIo];
  for (int round = 0; round < 16; ++round) {
    size_t want = up_ ? 64 : std::min<uint64_t>(sizeof(buf), total_ - done_);
    if (want == 0) want = 1;  // anything now is unexpected; read it to report it
    ssize_t n = read(fd_, buf, want);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      return Fail(std::string("read: ") + std::strerror(errno));
    }
    if (n == 0) return Fail("closed during a transfer");
    if (up_) {
      ack_.append(buf, static_cast<size_t>(n));
      size_t nl = ack_.find('\n');
      if (nl == std::string::npos) continue;
      if (nl + 1 != ack_.size() || done_ != total_)
        return Fail("unexpected bytes from the backend");
      if (std::strtoull(ack_.c_str(), nullptr, 10) != total_)
        return Fail("backend acknowledged a wrong count");
      return run_->TransferDone(this, total_);
    }
    if (done_ >= total_) return Fail("more bytes than requested");
    if (++reads_ % kVerifyEvery == 1 && !MatchesPattern(buf, static_cast<size_t>(n), done_)) {
      run_->PatternError();
    }
    done_ += static_cast<uint64_t>(n);
    if (done_ == total_) return run_->TransferDone(this, total_);
  }
}

// -- handshake and idle: connect, preamble, one echoed byte --

class ProbeRun;

class ProbeConn : public ClientConn {
 public:
  ProbeConn(Poller* p, const ClientOptions* o, ProbeRun* run)
      : ClientConn(p, o, /*self_owned=*/true), run_(run) {}
  void Finish() { Close(); }

 protected:
  void OnReady() override;
  void OnData(uint32_t ev) override;
  void Fail(const std::string& why) override;

 private:
  ProbeRun* run_;
  bool echoed_ = false;
};

// Runs probes: `handshake` (close each after its echo, keep C in flight for S seconds) or
// `idle` (keep each after its echo, K in all).
class ProbeRun {
 public:
  ProbeRun(Flags& flags, bool idle) : idle_(idle), opts_(ReadClientOptions(flags)) {
    if (idle) {
      count_ = flags.GetSize("count", 1000);
      concurrency_ = static_cast<int>(flags.GetSize("parallel", 64));
      watch_stdin_ = flags.Has("stdin");
      flags.Get("stdin");
      timeout_s_ = flags.GetDouble("timeout", 120);
    } else {
      concurrency_ = static_cast<int>(flags.GetSize("concurrency", 1));
      seconds_ = flags.GetDouble("seconds", 3);
      opts_.pipeline = flags.Has("pipeline");
      flags.Get("pipeline");
      timeout_s_ = flags.GetDouble("timeout", 10);
    }
    flags.CheckAllUsed();
    if (concurrency_ < 1) Die("--concurrency must be positive");
  }

  int Run() {
    signal(SIGPIPE, SIG_IGN);
    StopWatch stop(&poller_, watch_stdin_);
    start_ns_ = NowNs();
    cpu_start_ = CpuSeconds();
    stop_ns_ = start_ns_ + static_cast<uint64_t>(seconds_ * 1e9);
    uint64_t hard = start_ns_ + static_cast<uint64_t>((seconds_ + timeout_s_) * 1e9);
    latencies_.reserve(1 << 20);
    for (int i = 0; i < concurrency_; ++i) StartOne();
    while (in_flight_ > 0 && NowNs() < hard && !stop.stopped()) poller_.Wait(100);
    end_ns_ = NowNs();
    if (!idle_) return ReportHandshake();
    const char* unfinished = nullptr;
    if (in_flight_ > 0) {
      unfinished = stop.stopped() ? "stopped before all sessions were established" : "timeout";
    }
    int rc = ReportIdle(unfinished);
    // Hold the sessions until told to stop.
    while (!stop.stopped()) poller_.Wait(1000);
    std::fprintf(stderr,
                 "{\"mode\":\"idle-end\",\"held\":%" PRIu64 ",\"lost_while_idle\":%" PRIu64 "}\n",
                 established_ - lost_, lost_);
    return rc;
  }

  // Callbacks from the probes.
  void Echoed(ProbeConn* c) {
    uint64_t now = NowNs();
    if (idle_) {
      ++established_;
      --in_flight_;
      StartOne();
      return;
    }
    latencies_.push_back(now - c->started_ns());
    c->Finish();
    --in_flight_;
    StartOne();
  }
  void Failed(const std::string& why, bool was_established) {
    if (was_established) {
      ++lost_;
      return;
    }
    errors_.Add(why);
    --in_flight_;
    StartOne();
  }

 private:
  void StartOne() {
    for (;;) {
      if (idle_ ? started_ >= count_ : NowNs() >= stop_ns_) return;
      auto* c = new ProbeConn(&poller_, &opts_, this);
      ++started_;
      std::string why;
      if (c->Begin(&why)) {
        ++in_flight_;
        return;
      }
      delete c;
      errors_.Add(why);
      if (!idle_ && errors_.total() > 1000 && latencies_.empty()) return;  // nothing works
    }
  }

  int ReportHandshake() {
    double secs = static_cast<double>(end_ns_ - start_ns_) / 1e9;
    std::sort(latencies_.begin(), latencies_.end());
    auto pct = [this](double p) {
      if (latencies_.empty()) return 0.0;
      size_t i = static_cast<size_t>(p * static_cast<double>(latencies_.size() - 1) + 0.5);
      return static_cast<double>(latencies_[i]) / 1e3;
    };
    double mean = 0;
    for (uint64_t l : latencies_) mean += static_cast<double>(l);
    if (!latencies_.empty()) mean /= static_cast<double>(latencies_.size()) * 1e3;
    uint64_t timeouts = static_cast<uint64_t>(in_flight_);
    if (timeouts) errors_.Add("timeout");
    std::printf(
        "{\"mode\":\"handshake\",\"ok\":%s,\"target\":\"%s\",\"preamble\":%s,\"concurrency\":%d,"
        "\"connections\":%zu,\"seconds\":%.3f,\"conns_per_s\":%.1f,\"latency_us\":{\"mean\":%.1f,"
        "\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f},\"client_cpu_s\":%.3f,"
        "\"errors\":%s}\n",
        errors_.total() == 0 && !latencies_.empty() ? "true" : "false",
        FormatEndpoint(opts_.target).c_str(), opts_.preamble.empty() ? "false" : "true",
        concurrency_, latencies_.size(), secs, static_cast<double>(latencies_.size()) / secs, mean,
        pct(0.5), pct(0.9), pct(0.99), pct(0.999), pct(1.0), CpuSeconds() - cpu_start_,
        errors_.Json().c_str());
    std::fflush(stdout);
    return errors_.total() == 0 && !latencies_.empty() ? 0 : 1;
  }

  // `unfinished`: why sessions were still being set up when the run ended, or null.
  int ReportIdle(const char* unfinished) {
    if (unfinished) errors_.Add(unfinished);
    bool ok = established_ == count_;
    std::printf(
        "{\"mode\":\"idle\",\"ok\":%s,\"target\":\"%s\",\"preamble\":%s,\"requested\":%" PRIu64
        ",\"established\":%" PRIu64 ",\"seconds\":%.3f,\"errors\":%s}\n",
        ok ? "true" : "false", FormatEndpoint(opts_.target).c_str(),
        opts_.preamble.empty() ? "false" : "true", count_, established_,
        static_cast<double>(end_ns_ - start_ns_) / 1e9, errors_.Json().c_str());
    std::fflush(stdout);
    return ok ? 0 : 1;
  }

  bool idle_;
  ClientOptions opts_;
  Poller poller_;
  uint64_t count_ = 0;
  int concurrency_ = 1;
  double seconds_ = 0;
  double timeout_s_ = 10;
  bool watch_stdin_ = false;
  uint64_t started_ = 0;
  int in_flight_ = 0;
  uint64_t established_ = 0;
  uint64_t lost_ = 0;
  uint64_t start_ns_ = 0, stop_ns_ = 0, end_ns_ = 0;
  double cpu_start_ = 0;
  std::vector<uint64_t> latencies_;
  Errors errors_;
};

void ProbeConn::OnReady() {
  if (opts_->pipeline && !opts_->preamble.empty()) {
    // The probe byte went with the preamble; its echo may have come with the OK.
    if (early_ == "x") {
      echoed_ = true;
      return run_->Echoed(this);
    }
    if (!early_.empty()) return Fail("wrong echo");
  } else {
    ssize_t n = send(fd_, "x", 1, MSG_NOSIGNAL);
    if (n != 1) return Fail("probe: write failed");
  }
  SetInterest(EPOLLIN);
}

void ProbeConn::OnData(uint32_t) {
  char buf[16];
  ssize_t n = read(fd_, buf, sizeof(buf));
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0)
    return Fail(n == 0 ? "closed before the echo" : std::string("read: ") + std::strerror(errno));
  if (echoed_ || n != 1 || buf[0] != 'x') return Fail("wrong echo");
  echoed_ = true;
  run_->Echoed(this);
}

void ProbeConn::Fail(const std::string& why) {
  bool was = echoed_;
  Close();
  run_->Failed(why, was);
}

// -- slowread --

class SlowConn : public ClientConn {
 public:
  SlowConn(Poller* p, const ClientOptions* o) : ClientConn(p, o, /*self_owned=*/false) {}
  bool ready() const { return ready_; }
  bool failed() const { return !error_.empty(); }
  const std::string& error() const { return error_; }
  uint64_t received() const { return received_; }
  uint64_t pattern_errors() const { return pattern_errors_; }
  void Shutdown() { Close(); }

  // Reads up to `budget` bytes now, without waiting.
  void ReadSome(size_t budget) {
    if (!ready_ || closed_) return;
    static thread_local char buf[kMaxIo];
    while (budget > 0) {
      ssize_t n = read(fd_, buf, std::min(budget, sizeof(buf)));
      if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) Fail(std::string("read: ") + std::strerror(errno));
        return;
      }
      if (n == 0) return Fail("closed by the peer");
      if (++reads_ % kVerifyEvery == 1 && !MatchesPattern(buf, static_cast<size_t>(n), received_)) {
        ++pattern_errors_;
      }
      received_ += static_cast<uint64_t>(n);
      budget -= static_cast<size_t>(n);
    }
  }

 protected:
  void OnReady() override {
    static const std::string kRequest = "D 1125899906842624\n";  // 1 PiB: endless
    if (send(fd_, kRequest.data(), kRequest.size(), MSG_NOSIGNAL) !=
        static_cast<ssize_t>(kRequest.size())) {
      return Fail("request: short write");
    }
    ready_ = true;
    SetInterest(0);  // reads are paced by the timer, not by readiness
  }
  void OnData(uint32_t) override {}
  void Fail(const std::string& why) override {
    if (error_.empty()) error_ = why;
    Close();
  }

 private:
  bool ready_ = false;
  std::string error_;
  uint64_t received_ = 0;
  uint64_t reads_ = 0;
  uint64_t pattern_errors_ = 0;
};

int RunSlowRead(Flags& flags) {
  ClientOptions opts = ReadClientOptions(flags);
  int streams = static_cast<int>(flags.GetSize("streams", 1));
  size_t chunk = flags.GetSize("chunk", 64 * 1024);
  double interval_ms = flags.GetDouble("interval-ms", 10);
  double seconds = flags.GetDouble("seconds", 3);
  flags.CheckAllUsed();
  signal(SIGPIPE, SIG_IGN);
  Poller poller;
  StopWatch stop(&poller, false);
  std::vector<std::unique_ptr<SlowConn>> conns;
  Errors errors;
  for (int i = 0; i < streams; ++i) {
    auto c = std::make_unique<SlowConn>(&poller, &opts);
    std::string why;
    if (!c->Begin(&why)) {
      errors.Add(why);
      continue;
    }
    conns.push_back(std::move(c));
  }
  uint64_t deadline = NowNs() + 10'000'000'000ull;
  auto all_ready = [&] {
    for (auto& c : conns) {
      if (!c->ready() && !c->failed()) return false;
    }
    return true;
  };
  while (!all_ready() && NowNs() < deadline) poller.Wait(50);
  uint64_t start = NowNs();
  uint64_t stop_at = start + static_cast<uint64_t>(seconds * 1e9);
  uint64_t step = static_cast<uint64_t>(interval_ms * 1e6);
  uint64_t next = start;
  while (NowNs() < stop_at && !stop.stopped()) {
    uint64_t now = NowNs();
    if (now >= next) {
      for (auto& c : conns) c->ReadSome(chunk);
      next += step;
    }
    uint64_t wait_ns = next > now ? next - now : 0;
    poller.Wait(static_cast<int>(wait_ns / 1'000'000));
  }
  double secs = static_cast<double>(NowNs() - start) / 1e9;
  uint64_t total = 0, pattern_errors = 0;
  int ok_streams = 0;
  for (auto& c : conns) {
    total += c->received();
    pattern_errors += c->pattern_errors();
    if (c->failed()) {
      errors.Add(c->error());
    } else {
      ++ok_streams;
    }
  }
  for (auto& c : conns) c->Shutdown();
  bool ok = ok_streams == streams && pattern_errors == 0;
  std::printf(
      "{\"mode\":\"slowread\",\"ok\":%s,\"target\":\"%s\",\"preamble\":%s,\"streams\":%d,"
      "\"chunk\":%zu,\"interval_ms\":%.1f,\"seconds\":%.3f,\"total_bytes\":%" PRIu64
      ",\"mbyte_per_s\":%.2f,\"pattern_errors\":%" PRIu64 ",\"errors\":%s}\n",
      ok ? "true" : "false", FormatEndpoint(opts.target).c_str(),
      opts.preamble.empty() ? "false" : "true", streams, chunk, interval_ms, secs, total,
      static_cast<double>(total) / secs / 1e6, pattern_errors, errors.Json().c_str());
  return ok ? 0 : 1;
}

void Usage() {
  std::fprintf(
      stderr,
      "usage: brokerproxy_loadgen MODE [flags]\n"
      "  backends: serve|sink|source|echo [--listen 127.0.0.1:0]\n"
      "  throughput --connect H:P [--preamble TEXT|--preamble-file F] --streams N\n"
      "             --bytes B --direction up|down --seconds S\n"
      "  handshake  --connect H:P [--preamble ...] [--pipeline] --concurrency C --seconds S\n"
      "  idle       --connect H:P [--preamble ...] --count K [--parallel P] [--stdin]\n"
      "  slowread   --connect H:P [--preamble ...] [--streams N] [--chunk 64K]\n"
      "             [--interval-ms 10] --seconds S\n"
      "Sizes take K/M/G suffixes (powers of 1024). One JSON object is printed per run.\n");
}

}  // namespace
}  // namespace brokerproxy::bench

int main(int argc, char** argv) {
  using namespace brokerproxy::bench;
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    Usage();
    return argc < 2 ? 2 : 0;
  }
  const char* mode = argv[1];
  Flags flags(argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (!std::strcmp(mode, "serve") || !std::strcmp(mode, "sink") || !std::strcmp(mode, "source") ||
      !std::strcmp(mode, "echo")) {
    return RunServer(mode, flags);
  }
  if (!std::strcmp(mode, "throughput")) {
    signal(SIGPIPE, SIG_IGN);
    ThroughputRun run(flags);
    return run.Run();
  }
  if (!std::strcmp(mode, "handshake")) return ProbeRun(flags, false).Run();
  if (!std::strcmp(mode, "idle")) return ProbeRun(flags, true).Run();
  if (!std::strcmp(mode, "slowread")) return RunSlowRead(flags);
  Usage();
  return 2;
}
