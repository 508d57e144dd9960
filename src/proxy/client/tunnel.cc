#include "proxy/client/tunnel.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "loop/address.h"
#include "loop/handle.h"
#include "loop/timer.h"
#include "proxy/transport/dialer.h"

namespace brokerproxy::proxy::client {

ProxyEndpoint::ProxyEndpoint(loop::Reactor* reactor, std::string host, int port, std::string job,
                             std::string secret, int64_t handshake_timeout_ms)
    : loop(&reactor->loop()),
      reactor(reactor),
      resolver(loop, 60000),
      host(std::move(host)),
      port(port),
      job(std::move(job)),
      secret(std::move(secret)),
      timeout_ms(handshake_timeout_ms) {}

std::string ProxyEndpoint::Address() const { return HostPort{host, port}.ToString(); }

loop::HandlePtr<loop::Timer> ProxyEndpoint::Reach(proxy::Dialer* dialer, const std::string& what,
                                                  std::function<void(Status)> fail,
                                                  std::function<void(loop::IoHandle)> connected) {
  auto timer = HandshakeTimer(*loop, timeout_ms, what, fail);
  dialer->Dial(
      host, port,
      [fail = std::move(fail), connected = std::move(connected)](Result<loop::IoHandle> upstream) {
        if (!upstream.ok()) {
          fail(Status::Unavailable("cannot reach the proxy: " + upstream.status().message()));
          return;
        }
        loop::IoHandle io = std::move(upstream).value();
        proxy::TuneTcpSocket(io.fd(), 60);
        connected(std::move(io));
      });
  return timer;
}

loop::HandlePtr<loop::Timer> HandshakeTimer(loop::Loop& loop, int64_t timeout_ms,
                                            const std::string& what,
                                            std::function<void(Status)> fail) {
  auto t = loop::Timer::Create(loop);
  if (!t.ok()) return nullptr;
  std::string message = what + " within " + std::to_string(timeout_ms / 1000) + "s";
  (*t)->Start(static_cast<uint64_t>(timeout_ms),
              [fail = std::move(fail), message] { fail(Status::Timeout(message)); });
  return std::move(t).value();
}

void EarlyBytes::Preload(std::string replay) {
  budget_ -= std::min(budget_, replay.size());
  pending_ = std::move(replay);
}

void EarlyBytes::Watch(proxy::Relay::Side& side, std::function<void()> wake) {
  struct stat st {};
  if (!side.in || ::fstat(side.in.fd(), &st) != 0 ||
      !(S_ISSOCK(st.st_mode) || S_ISFIFO(st.st_mode)))
    return;
  watch_ = side.in.get();
  watch_->SetCallback([wake = std::move(wake)](loop::IoWatch*) { wake(); });
  if (watch_->readable() || !pending_.empty()) watch_->Yield();
}

Status EarlyBytes::Pump(const Sink& sink) {
  if (!watch_) return Status::OK();
  if (!pending_.empty()) {
    size_t took = sink(pending_);
    sent_.append(pending_, 0, took);
    pending_.erase(0, took);
    if (!pending_.empty()) return Status::OK();
  }
  char buf[16 * 1024];
  while (budget_ > 0 && watch_->readable()) {
    ssize_t n = ::read(watch_->fd(), buf, std::min(sizeof(buf), budget_));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      watch_->ClearReadable();
      break;
    }
    if (n < 0) return PosixError("reading the local connection", errno);
    if (n == 0) {
      budget_ = 0;  // EOF: the relay reads it again
      break;
    }
    budget_ -= n;
    size_t took = sink(std::string_view(buf, n));
    sent_.append(buf, took);
    if (took < static_cast<size_t>(n)) {
      pending_.assign(buf + took, n - took);
      break;
    }
  }
  return Status::OK();
}

std::string EarlyBytes::Stop() {
  if (watch_) watch_->SetCallback(nullptr);
  watch_ = nullptr;
  std::string().swap(sent_);
  return std::move(pending_);
}

std::string EarlyBytes::StopAndReplay() {
  std::string all = std::move(sent_) + pending_;
  Stop();
  pending_.clear();
  return all;
}

ClientHandshake::ClientHandshake(std::string job, std::string replay) : job_(std::move(job)) {
  early_.Preload(std::move(replay));
}

size_t ClientHandshake::Feed(std::string_view from_proxy) { return reply_.Feed(from_proxy); }

Status ClientHandshake::Conclude(proxy::Relay::Side& local, std::string* unsent,
                                 std::optional<Refused>* refused) {
  if (reply_.state() != proxy::ReplyReader::State::kDone) {
    early_.Stop();
    return Status::IOError("the proxy's reply is too long");
  }
  const proxy::Reply& reply = reply_.reply();
  Status s = proxy::ReplyStatus(reply, job_);
  if (s.ok()) {
    *unsent = early_.Stop();
    return s;
  }
  if (proxy::WorthRefetchingSecret(reply)) {
    *refused = Refused{std::move(local), early_.StopAndReplay()};
  } else {
    early_.Stop();
  }
  return s;
}

namespace {

class DirectPath;

class DirectTunnel final : public Tunnel {
 public:
  DirectTunnel(DirectPath* path, proxy::Relay::Side local, std::string replay,
               ProxyPath::Done done);
  void Start();

 private:
  void OnConnected(loop::IoHandle upstream);
  void OnReadable();
  void PumpEarly();
  void Finish(Status status);

  DirectPath* path_;
  proxy::Relay::Side local_;
  ProxyPath::Done done_;
  proxy::Dialer dialer_;
  loop::HandlePtr<loop::Timer> timer_;
  loop::IoHandle upstream_;
  ClientHandshake hs_;
  std::unique_ptr<proxy::Relay> relay_;
};

class DirectPath final : public ProxyPath {
 public:
  DirectPath(proxy::PipePool* pipes, ProxyEndpoint endpoint)
      : pipes_(pipes), ep_(std::move(endpoint)) {}

  std::unique_ptr<Tunnel> Open(proxy::Relay::Side local, std::string replay, Done done) override {
    auto t =
        std::make_unique<DirectTunnel>(this, std::move(local), std::move(replay), std::move(done));
    t->Start();
    return t;
  }
  void SetSecret(std::string secret) override { ep_.secret = std::move(secret); }
  std::string Describe() const override { return ep_.Address(); }

  proxy::PipePool* pipes_;
  ProxyEndpoint ep_;
};

DirectTunnel::DirectTunnel(DirectPath* path, proxy::Relay::Side local, std::string replay,
                           ProxyPath::Done done)
    : path_(path),
      local_(std::move(local)),
      done_(std::move(done)),
      dialer_(path->ep_.reactor, &path->ep_.resolver),
      hs_(path->ep_.job, std::move(replay)) {}

void DirectTunnel::Start() {
  timer_ = path_->ep_.Reach(
      &dialer_, "no answer from the proxy at " + path_->Describe(),
      [this](Status s) { Finish(std::move(s)); },
      [this](loop::IoHandle upstream) { OnConnected(std::move(upstream)); });
}

void DirectTunnel::OnConnected(loop::IoHandle upstream) {
  upstream_ = std::move(upstream);
  std::string line = hs_.Preamble(path_->ep_.secret);
  // An empty socket buffer takes the short line at once.
  if (proxy::SendBestEffort(upstream_->fd(), line) != line.size()) {
    Finish(Status::IOError("cannot send the handshake to the proxy"));
    return;
  }
  upstream_->SetCallback([this](loop::IoWatch*) { OnReadable(); });
  if (upstream_->readable()) upstream_->Yield();  // the reply may be there already
  hs_.early().Watch(local_, [this] { PumpEarly(); });
}

void DirectTunnel::PumpEarly() {
  Status s = hs_.early().Pump([this](std::string_view data) -> size_t {
    ssize_t n = ::send(upstream_->fd(), data.data(), data.size(), MSG_NOSIGNAL);
    return n > 0 ? static_cast<size_t>(n) : 0;  // a failed send shows in the reply
  });
  if (!s.ok()) Finish(s);
}

void DirectTunnel::OnReadable() {
  if (!upstream_->readable()) return;
  char buf[proxy::kMaxReplyLine];
  // Consume the reply line only: the backend's first bytes may follow it in the same segment.
  ssize_t n = ::recv(upstream_->fd(), buf, sizeof(buf), MSG_PEEK);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) upstream_->ClearReadable();
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
  if (n <= 0) {
    Finish(Status::Unavailable("the proxy closed the connection during the handshake"));
    return;
  }
  size_t take = hs_.Feed(std::string_view(buf, static_cast<size_t>(n)));
  if (take > 0 && ::recv(upstream_->fd(), buf, take, 0) != static_cast<ssize_t>(take)) {
    Finish(Status::IOError("reading the proxy's reply failed"));
    return;
  }
  // All that had arrived is consumed: newer bytes bring their own edge.
  if (take == static_cast<size_t>(n) && take < sizeof(buf) && !upstream_->hangup()) {
    upstream_->ClearReadable();
  }
  if (!hs_.done()) return;
  std::string early;
  Status s = hs_.Conclude(local_, &early, &refused_);
  if (!s.ok()) {
    Finish(s);
    return;
  }
  timer_.reset();
  relay_ = std::make_unique<proxy::Relay>(
      path_->pipes_, std::move(local_), proxy::Relay::Side{std::move(upstream_)},
      "local connection", "proxy", std::string(), std::move(early),
      [this](Status s) { Finish(std::move(s)); });
  relay_->Start();
}

void DirectTunnel::Finish(Status status) {
  timer_.reset();
  // Nothing may run on the local side any more: its early-bytes callback would write upstream.
  hs_.Stop();
  local_ = proxy::Relay::Side{};
  upstream_.reset();
  ProxyPath::Done done = std::move(done_);
  if (done) done(std::move(status));  // may destroy this
}

}  // namespace

std::unique_ptr<ProxyPath> NewDirectPath(loop::Reactor* reactor, proxy::PipePool* pipes,
                                         std::string host, int port, std::string job,
                                         std::string secret, int64_t handshake_timeout_ms) {
  return std::make_unique<DirectPath>(
      pipes, ProxyEndpoint(reactor, std::move(host), port, std::move(job), std::move(secret),
                           handshake_timeout_ms));
}

}  // namespace brokerproxy::proxy::client
