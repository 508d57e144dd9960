#include "cli/tls_path.h"

#include <openssl/err.h>

#include "loop/handle.h"
#include "loop/poll.h"
#include "loop/timer.h"
#include "proxy/certs.h"
#include "proxy/dialer.h"
#include "proxy/relay.h"
#include "proxy/tls_relay.h"

namespace brokerproxy::cli {
namespace {

class TlsPath;

class TlsTunnel final : public Tunnel {
 public:
  TlsTunnel(TlsPath* path, proxy::Relay::Side local, std::string replay, ProxyPath::Done done);
  void Start();

 private:
  void OnConnected(Result<loop::IoHandle> upstream);
  void OnHandshake();
  void OnData();
  void PumpEarly();
  void Finish(Status status);

  TlsPath* path_;
  proxy::Relay::Side local_;
  ProxyPath::Done done_;
  proxy::Dialer dialer_;
  loop::HandlePtr<loop::Timer> timer_;
  std::unique_ptr<proxy::TlsRelay> tls_;
  EarlyBytes early_;
  bool relaying_ = false;
};

class TlsPath final : public ProxyPath {
 public:
  TlsPath(proxy::SslCtxPtr ctx, ProxyEndpoint endpoint)
      : ctx_(std::move(ctx)), ep_(std::move(endpoint)) {}

  std::unique_ptr<Tunnel> Open(proxy::Relay::Side local, std::string replay, Done done) override {
    auto t =
        std::make_unique<TlsTunnel>(this, std::move(local), std::move(replay), std::move(done));
    t->Start();
    return t;
  }
  void SetSecret(std::string secret) override { ep_.secret = std::move(secret); }
  std::string Describe() const override { return "TLS to " + ep_.Address(); }

  proxy::SslCtxPtr ctx_;
  ProxyEndpoint ep_;
};

TlsTunnel::TlsTunnel(TlsPath* path, proxy::Relay::Side local, std::string replay,
                     ProxyPath::Done done)
    : path_(path),
      local_(std::move(local)),
      done_(std::move(done)),
      dialer_(path->ep_.reactor, &path->ep_.resolver) {
  early_.Preload(std::move(replay));
}

void TlsTunnel::Start() {
  timer_ = HandshakeTimer(*path_->ep_.loop, path_->ep_.timeout_ms,
                          "no TLS session with the proxy at " + path_->Describe(),
                          [this](Status s) { Finish(std::move(s)); });
  dialer_.Dial(path_->ep_.host, path_->ep_.port,
               [this](Result<loop::IoHandle> r) { OnConnected(std::move(r)); });
}

void TlsTunnel::OnConnected(Result<loop::IoHandle> io) {
  if (!io.ok()) {
    Finish(Status::Unavailable("cannot reach the proxy: " + io.status().message()));
    return;
  }
  // TLS moves bytes in user space, on a level-triggered poll.
  auto upstream = proxy::ToPoll(*path_->ep_.loop, std::move(io).value());
  if (!upstream.ok()) {
    Finish(upstream.status());
    return;
  }
  proxy::TuneTcpSocket((*upstream)->fd(), 60);
  ERR_clear_error();
  proxy::SslPtr ssl(SSL_new(path_->ctx_.get()));
  if (!ssl) {
    Finish(proxy::SslError("SSL_new"));
    return;
  }
  Status s = proxy::SetClientPeerName(ssl.get(), path_->ep_.host);
  if (!s.ok()) {
    Finish(s);
    return;
  }
  proxy::TlsRelay::Callbacks cb;
  cb.on_handshake = [this] { OnHandshake(); };
  cb.on_data = [this] { OnData(); };
  cb.on_done = [this](Status st) { Finish(std::move(st)); };
  tls_ = std::make_unique<proxy::TlsRelay>(proxy::TlsRelay::Role::kClient, std::move(ssl),
                                           std::move(upstream).value(), std::string(), "proxy",
                                           std::move(cb));
  tls_->Start();
}

void TlsTunnel::OnHandshake() {
  // OpenSSL verified the chain and the name; the secret goes only to a proxy certificate.
  X509* peer = SSL_get0_peer_certificate(tls_->ssl());
  if (!peer || !proxy::IsProxyCertificate(peer)) {
    Finish(Status::PermissionDenied("the certificate at " + path_->Describe() +
                                    " is signed by the broker CA but is not the proxy's (OU '" +
                                    (peer ? proxy::SubjectUnit(peer) : std::string()) +
                                    "'); refusing to send the job's secret"));
    return;
  }
  Status s = tls_->Send(PreambleLine(path_->ep_.job, path_->ep_.secret));
  if (!s.ok()) {
    Finish(s);
    return;
  }
  early_.Watch(local_, [this] { PumpEarly(); });
}

void TlsTunnel::PumpEarly() {
  Status s = early_.Pump([this](std::string_view data) -> size_t {
    return tls_->Send(data).ok() ? data.size() : 0;  // a failed session ends the tunnel anyway
  });
  if (!s.ok()) Finish(s);
}

void TlsTunnel::OnData() {
  if (relaying_) return;
  std::string_view inbox = tls_->inbox();
  size_t nl = inbox.find('\n');
  if (nl == std::string_view::npos) {
    if (inbox.size() >= kMaxReplyLine) {
      Finish(Status::IOError("the proxy's reply is too long"));
    } else if (tls_->peer_done()) {
      Finish(Status::Unavailable("the proxy closed the connection during the handshake"));
    }
    return;
  }
  std::string line(inbox.substr(0, nl));
  tls_->Consume(nl + 1);  // what follows "OK\n" is the backend's and stays in the inbox
  Status s = StatusFromReply(line, path_->ep_.job);
  if (!s.ok()) {
    if (IsRetryableRefusal(line)) refused_ = Refused{std::move(local_), early_.StopAndReplay()};
    Finish(s);
    return;
  }
  timer_.reset();
  if (std::string up = early_.Stop(); !up.empty()) {
    if (Status sent = tls_->Send(up); !sent.ok()) {
      Finish(sent);
      return;
    }
  }
  relaying_ = true;
  auto local = proxy::ToPolls(*path_->ep_.loop, std::move(local_));
  if (!local.ok()) {
    Finish(local.status());
    return;
  }
  tls_->Attach(std::move(local).value(), "local connection");
}

void TlsTunnel::Finish(Status status) {
  timer_.reset();
  early_.Stop();
  local_ = proxy::Relay::Side{};
  if (tls_ && !relaying_) tls_->Abort("");
  ProxyPath::Done done = std::move(done_);
  if (done) done(std::move(status));  // may destroy this
}

}  // namespace

std::unique_ptr<ProxyPath> NewTlsPath(loop::Reactor* reactor, proxy::SslCtxPtr ctx,
                                      std::string host, int port, std::string job,
                                      std::string secret, int64_t handshake_timeout_ms) {
  return std::make_unique<TlsPath>(std::move(ctx),
                                   ProxyEndpoint(reactor, std::move(host), port, std::move(job),
                                                 std::move(secret), handshake_timeout_ms));
}

}  // namespace brokerproxy::cli
