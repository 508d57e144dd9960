// The SSH path of `connect --via`: one SSH session to the login node, driven nonblocking on the
// reactor (proxy/transport/ssh_splice.h); per local connection one direct-tcpip channel to the
// proxy port as the login node sees it, the BROKER1 preamble (and what the local client already
// sent, see EarlyBytes), the proxy's "OK", then a ChannelSplice: the one pump (relay.h) between
// the local connection and the channel. Closing a local connection closes only its channel.

#include <memory>
#include <string>
#include <vector>

#include "loop/address.h"
#include "loop/handle.h"
#include "loop/lifetime.h"
#include "loop/log.h"
#include "loop/timer.h"
#include "proxy/client/tunnel.h"
#include "proxy/transport/ssh_splice.h"

namespace brokerproxy::proxy::client {
namespace {

class SshPath;

class SshTunnel final : public Tunnel {
 public:
  SshTunnel(SshPath* path, proxy::Relay::Side local, std::string replay, ProxyPath::Done done);
  ~SshTunnel() override;

  // Advances the tunnel; never calls `done` (Complete() does).
  void Step();
  // Ends the tunnel with `status` (kept for Complete()).
  void Fail(Status status);
  bool finished() const { return finished_; }
  bool completed() const { return completed_; }
  // Reports the outcome once. May destroy this tunnel.
  void Complete();

 private:
  enum class State { kOpening, kReply, kSplicing };

  SshPath* path_;
  State state_ = State::kOpening;
  proxy::Relay::Side local_;
  ProxyPath::Done done_;
  std::unique_ptr<proxy::ChannelSplice> splice_;
  loop::HandlePtr<loop::Timer> timer_;
  ClientHandshake hs_;
  std::string preamble_;  // not yet accepted by libssh
  bool early_watched_ = false;
  bool finished_ = false;
  bool completed_ = false;
  Status status_;
};

class SshPath final : public ProxyPath {
 public:
  SshPath(loop::Reactor* reactor, std::unique_ptr<proxy::SshTransport> transport, std::string via,
          std::string host, int port, std::string job, std::string secret, int64_t timeout_ms,
          std::function<void(Status)> on_lost)
      : loop_(&reactor->loop()),
        transport_(std::move(transport)),
        via_(std::move(via)),
        host_(std::move(host)),
        port_(port),
        job_(std::move(job)),
        secret_(std::move(secret)),
        timeout_ms_(timeout_ms),
        on_lost_(std::move(on_lost)) {}

  ~SshPath() override {
    lifetime_.End();
    // Tunnels are owned by `connect` and must be gone already; drop any stragglers' link.
    for (SshTunnel* t : tunnels_) t->Fail(Status::Unavailable("shutting down"));
    transport_.reset();
  }

  void Start() {
    transport_->Start([this] { Service(); });
  }

  std::unique_ptr<Tunnel> Open(proxy::Relay::Side local, std::string replay, Done done) override {
    auto t =
        std::make_unique<SshTunnel>(this, std::move(local), std::move(replay), std::move(done));
    tunnels_.push_back(t.get());
    Kick();  // opens the channel on a later turn: `done` must never run inside Open()
    return t;
  }

  void SetSecret(std::string secret) override { secret_ = std::move(secret); }

  std::string Describe() const override {
    return HostPort{host_, port_}.ToString() + " via ssh to " + via_;
  }

  // The owner entry point: process packets, advance every tunnel, report finished ones.
  void Service() {
    if (in_service_ || !transport_) return;
    in_service_ = true;
    if (lost_.ok()) {
      Status s = transport_->Process();
      if (!s.ok())
        lost_ = Status::Unavailable("lost the ssh connection to " + via_ + ": " + s.message());
    }
    if (!lost_.ok()) {
      for (SshTunnel* t : tunnels_) t->Fail(lost_);
    } else {
      // Index loop: libssh calls inside a step never add tunnels, but stay safe.
      for (size_t i = 0; i < tunnels_.size(); ++i) tunnels_[i]->Step();
    }
    in_service_ = false;
    std::vector<SshTunnel*> finished;
    for (SshTunnel* t : tunnels_) {
      if (t->finished() && !t->completed()) finished.push_back(t);
    }
    loop::Lifetime::Weak alive = lifetime_.weak();
    for (SshTunnel* t : finished) {
      t->Complete();  // may destroy t (only t)
      if (!alive.alive()) return;
    }
    if (!lost_.ok()) {
      if (on_lost_) {
        auto cb = std::move(on_lost_);
        on_lost_ = nullptr;
        cb(lost_);  // may destroy this path
      }
    }
  }

  // Runs Service() on a later loop turn.
  void Kick() {
    loop_->Defer(lifetime_.Guard([this] { Service(); }));
  }

  void Unregister(SshTunnel* t) { std::erase(tunnels_, t); }

  loop::Loop* loop_;
  std::unique_ptr<proxy::SshTransport> transport_;
  std::string via_;
  std::string host_;
  int port_;
  std::string job_;
  std::string secret_;
  int64_t timeout_ms_;
  std::function<void(Status)> on_lost_;
  std::vector<SshTunnel*> tunnels_;
  Status lost_;
  bool in_service_ = false;
  loop::Lifetime lifetime_;  // last member: ends first
};

SshTunnel::SshTunnel(SshPath* path, proxy::Relay::Side local, std::string replay,
                     ProxyPath::Done done)
    : path_(path),
      local_(std::move(local)),
      done_(std::move(done)),
      hs_(path->job_, std::move(replay)),
      preamble_(hs_.Preamble(path->secret_)) {
  ssh_channel ch = ssh_channel_new(path_->transport_->session());
  if (ch == nullptr) {
    Fail(Status::Unavailable("cannot create an ssh channel"));
    return;
  }
  splice_ = std::make_unique<proxy::ChannelSplice>(ch, [path] { path->Service(); });
  timer_ = HandshakeTimer(*path_->loop_, path_->timeout_ms_,
                          "no answer from the proxy at " + path_->Describe(), [this](Status s) {
                            Fail(std::move(s));
                            path_->Service();
                          });
}

SshTunnel::~SshTunnel() {
  path_->Unregister(this);
  timer_.reset();
  splice_.reset();  // closes the channel (and the local connection, if it was attached)
}

void SshTunnel::Fail(Status status) {
  if (finished_) return;
  finished_ = true;
  status_ = std::move(status);
  timer_.reset();
  if (splice_) splice_->Fail(status_);
  hs_.Stop();
  local_ = proxy::Relay::Side{};  // closes the local connection if not spliced yet
}

void SshTunnel::Complete() {
  if (completed_) return;
  completed_ = true;
  ProxyPath::Done done = std::move(done_);
  if (done) done(status_);  // may destroy this
}

void SshTunnel::Step() {
  if (finished_) return;
  switch (state_) {
    case State::kOpening: {
      int rc = ssh_channel_open_forward(splice_->channel(), path_->host_.c_str(), path_->port_,
                                        "127.0.0.1", 0);
      if (rc == SSH_AGAIN) return;
      if (rc != SSH_OK) {
        Fail(Status::Unavailable("the login node " + path_->via_ +
                                 " refused to forward to the proxy port " + path_->host_ + ":" +
                                 std::to_string(path_->port_) + " (" +
                                 ssh_get_error(path_->transport_->session()) + ")"));
        return;
      }
      state_ = State::kReply;
      [[fallthrough]];
    }
    case State::kReply: {
      while (!preamble_.empty()) {
        auto n = splice_->WriteRaw(preamble_);
        if (!n.ok()) {
          Fail(Status::Unavailable("cannot send the handshake: " + n.status().message()));
          return;
        }
        if (*n == 0) return;  // window closed or a key exchange: later
        preamble_.erase(0, *n);
      }
      if (!early_watched_) {
        early_watched_ = true;
        hs_.early().Watch(local_, [path = path_] { path->Service(); });
      }
      Status early_status = hs_.early().Pump([this](std::string_view data) -> size_t {
        auto n = splice_->WriteRaw(data);
        return n.ok() ? *n : 0;  // a failed channel shows in the reply
      });
      if (!early_status.ok()) {
        Fail(early_status);
        return;
      }
      auto got = splice_->ReadRaw(proxy::kMaxReplyLine);
      if (!got.ok()) {
        Fail(Status::Unavailable("the proxy at " + path_->Describe() +
                                 " closed the connection during the handshake"));
        return;
      }
      size_t took = hs_.Feed(*got);
      if (!hs_.done()) return;
      std::string down = got->substr(took);  // the backend's first bytes, if any
      std::string up;                        // the local bytes libssh has not taken yet
      Status s = hs_.Conclude(local_, &up, &refused_);
      if (!s.ok()) {
        Fail(s);
        return;
      }
      timer_.reset();
      // The local side stays in the reactor; the splice takes over its callbacks.
      state_ = State::kSplicing;
      splice_->Attach(std::move(local_.in), std::move(local_.out), std::move(down), std::move(up));
      local_ = proxy::Relay::Side{};
      [[fallthrough]];
    }
    case State::kSplicing:
      splice_->Service();
      if (splice_->finished()) {
        finished_ = true;
        status_ = splice_->status();
      }
      return;
  }
}

}  // namespace

Result<std::unique_ptr<ProxyPath>> NewSshPath(loop::Reactor* reactor, proxy::SshSessionPtr session,
                                              std::string via, std::string host, int port,
                                              std::string job, std::string secret,
                                              int64_t handshake_timeout_ms,
                                              std::function<void(Status)> on_lost) {
  ssh_set_blocking(session.get(), 0);
  auto transport = proxy::SshTransport::Create(std::move(session), *reactor);
  if (!transport.ok()) return transport.status();
  (*transport)->set_disconnect_on_close(true);
  auto path = std::make_unique<SshPath>(reactor, std::move(transport).value(), std::move(via),
                                        std::move(host), port, std::move(job), std::move(secret),
                                        handshake_timeout_ms, std::move(on_lost));
  path->Start();
  return std::unique_ptr<ProxyPath>(std::move(path));
}

}  // namespace brokerproxy::proxy::client
