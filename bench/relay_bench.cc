// Micro-benchmark of the splice path: a Relay (proxy/transport/relay.h) between two socket pairs
// inside a loop::Loop, moving one chunk of N bytes per iteration from the "client" end to the
// "backend" end. The benchmark thread plays both applications: it writes the chunk into the client
// socket, turns the loop (UV_RUN_NOWAIT) and drains the backend socket until all N bytes have
// arrived. So the time per iteration is the relay's cost per chunk plus the two application-side
// copies that any proxy's peers pay as well.
//
// Checked every iteration: the bytes received and the relay's own counter both grow by exactly
// N. The bytes' contents are compared with what was sent on the first iteration and every 64th
// after it (a full memcmp would add a third copy to every chunk).
//
// Transports: AF_UNIX socketpairs, loopback TCP, and the copy fallback (the client side is a
// pair of pipes, as for the stdio client, so the relay must read()/write() instead of splice).

#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "loop/loop.h"
#include "loop/poll.h"
#include "proxy/transport/relay.h"

namespace brokerproxy::proxy {
namespace {

enum class Transport { kSocketPair, kTcp, kCopy };

// A connected pair of non-blocking stream sockets.
bool SocketPair(Transport t, int fds[2]) {
  if (t != Transport::kTcp) {
    return ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0;
  }
  int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (l < 0 || ::bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(l, 1) != 0 || ::getsockname(l, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (l >= 0) ::close(l);
    return false;
  }
  int c = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  bool ok = c >= 0 && ::connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  int s = ok ? ::accept4(l, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC) : -1;
  ::close(l);
  if (s < 0) {
    if (c >= 0) ::close(c);
    return false;
  }
  ::fcntl(c, F_SETFL, ::fcntl(c, F_GETFL) | O_NONBLOCK);
  int one = 1;
  ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  ::setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  fds[0] = c;
  fds[1] = s;
  return true;
}

// Everything one benchmark run needs, torn down in the order the handle rules require.
class Harness {
 public:
  // False (with `error` set) if any setup step failed.
  bool Init(Transport t, std::string* error) {
    auto loop = loop::Loop::Create();
    if (!loop.ok()) return Fail(error, loop.status().ToString());
    loop_ = std::move(loop).value();
    auto reactor = loop::Reactor::Create(*loop_);
    if (!reactor.ok()) return Fail(error, reactor.status().ToString());
    reactor_ = std::move(reactor).value();
    pool_ = std::make_unique<PipePool>(1 << 20, 64);  // the proxy's defaults (proxy.h)

    int backend[2];
    if (!SocketPair(t, backend)) return Fail(error, "backend socket pair");
    relay_backend_fd_ = backend[0];
    backend_app_ = backend[1];
    Relay::Side a;
    if (t == Transport::kCopy) {
      int in[2], out[2];
      if (::pipe2(in, O_NONBLOCK | O_CLOEXEC) != 0 || ::pipe2(out, O_NONBLOCK | O_CLOEXEC) != 0) {
        return Fail(error, "pipe2");
      }
      client_app_ = in[1];
      client_app_in_ = out[0];
      auto pin = reactor_->Add(in[0], nullptr);
      auto pout = reactor_->Add(out[1], nullptr);
      if (!pin.ok() || !pout.ok()) return Fail(error, "Reactor::Add");
      a = Relay::Side(std::move(pin).value(), std::move(pout).value());
    } else {
      int client[2];
      if (!SocketPair(t, client)) return Fail(error, "client socket pair");
      client_app_ = client[0];
      auto p = reactor_->Add(client[1], nullptr);
      if (!p.ok()) return Fail(error, "Reactor::Add");
      a = Relay::Side(std::move(p).value());
    }
    auto pb = reactor_->Add(relay_backend_fd_, nullptr);
    if (!pb.ok()) return Fail(error, "Reactor::Add");
    Relay::Side b(std::move(pb).value());
    relay_ = std::make_unique<Relay>(pool_.get(), std::move(a), std::move(b), "client", "backend",
                                     std::string(), std::string(),
                                     [this](Status s) { done_ = std::move(s), finished_ = true; });
    relay_->Start();
    return true;
  }

  ~Harness() {
    relay_.reset();  // closes the relay's fds
    for (int fd : {client_app_, client_app_in_, backend_app_}) {
      if (fd >= 0) ::close(fd);
    }
    reactor_.reset();
    if (loop_) {
      loop_->Run(UV_RUN_NOWAIT);
      (void)loop_->Close();
    }
    pool_.reset();
  }

  // Sends `chunk` through the relay and receives it at the backend. Returns "" or an error.
  std::string MoveChunk(const std::vector<char>& chunk, std::vector<char>* rx, bool verify) {
    const size_t n = chunk.size();
    const uint64_t before = relay_->counters().a_to_b;
    size_t sent = 0;
    size_t received = 0;
    while (received < n) {
      if (sent < n) {
        ssize_t w = ::write(client_app_, chunk.data() + sent, n - sent);
        if (w > 0) {
          sent += static_cast<size_t>(w);
        } else if (w < 0 && errno != EAGAIN) {
          return std::string("client write: ") + std::strerror(errno);
        }
      }
      loop_->Run(UV_RUN_NOWAIT);
      if (finished_) return "relay finished early: " + done_.ToString();
      for (;;) {
        ssize_t r = ::read(backend_app_, rx->data(), rx->size());
        if (r > 0) {
          if (received + static_cast<size_t>(r) > n) return "more bytes than sent";
          if (verify && std::memcmp(rx->data(), chunk.data() + received, r) != 0) {
            return "received bytes differ from the sent ones";
          }
          received += static_cast<size_t>(r);
          continue;
        }
        if (r == 0) return "backend saw EOF";
        if (errno != EAGAIN) return std::string("backend read: ") + std::strerror(errno);
        break;
      }
    }
    if (relay_->counters().a_to_b - before != n) return "relay counter disagrees";
    return std::string();
  }

 private:
  bool Fail(std::string* error, std::string what) {
    *error = std::move(what);
    return false;
  }

  std::unique_ptr<loop::Loop> loop_;
  std::unique_ptr<loop::Reactor> reactor_;
  std::unique_ptr<PipePool> pool_;
  std::unique_ptr<Relay> relay_;
  int client_app_ = -1;     // the benchmark writes the client's bytes here
  int client_app_in_ = -1;  // kCopy: where the relay writes bytes for the client
  int relay_backend_fd_ = -1;
  int backend_app_ = -1;  // the benchmark reads the backend's bytes here
  Status done_;
  bool finished_ = false;
};

void RelayChunks(benchmark::State& state, Transport t) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<char> chunk(n);
  for (size_t i = 0; i < n; ++i) chunk[i] = static_cast<char>((i * 131 + i / 251) & 0xff);
  std::vector<char> rx(1 << 20);
  Harness h;
  std::string error;
  if (!h.Init(t, &error)) {
    state.SkipWithError(error.c_str());
    return;
  }
  uint64_t iteration = 0;
  for (auto _ : state) {
    error = h.MoveChunk(chunk, &rx, iteration % 64 == 0);
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      break;
    }
    ++iteration;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_Relay_SocketPair(benchmark::State& state) { RelayChunks(state, Transport::kSocketPair); }
BENCHMARK(BM_Relay_SocketPair)->Arg(64 << 10)->Arg(1 << 20)->UseRealTime();

void BM_Relay_Tcp(benchmark::State& state) { RelayChunks(state, Transport::kTcp); }
BENCHMARK(BM_Relay_Tcp)->Arg(64 << 10)->Arg(1 << 20)->UseRealTime();

void BM_Relay_CopyPath(benchmark::State& state) { RelayChunks(state, Transport::kCopy); }
BENCHMARK(BM_Relay_CopyPath)->Arg(64 << 10)->Arg(1 << 20)->UseRealTime();

}  // namespace
}  // namespace brokerproxy::proxy
