#include "proxy/client/tls_path.h"

#include <openssl/err.h>
#include <sys/socket.h>

#include "loop/address.h"
#include "loop/handle.h"
#include "loop/timer.h"
#include "proxy/tls/certs.h"
#include "proxy/transport/dialer.h"
#include "proxy/transport/relay.h"
#include "proxy/transport/tls_relay.h"

namespace brokerproxy::proxy::client {
namespace {

class TlsPath;

class TlsTunnel final : public Tunnel {
 public:
  TlsTunnel(TlsPath* path, proxy::Relay::Side local, std::string replay, ProxyPath::Done done);
  void Start();

 private:
  void OnConnected(loop::IoHandle upstream);
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
  ClientHandshake hs_;
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
      dialer_(path->ep_.reactor, &path->ep_.resolver),
      hs_(path->ep_.job, std::move(replay)) {}

void TlsTunnel::Start() {
  timer_ = path_->ep_.Reach(
      &dialer_, "no TLS session with the proxy at " + path_->Describe(),
      [this](Status s) { Finish(std::move(s)); },
      [this](loop::IoHandle upstream) { OnConnected(std::move(upstream)); });
}

void TlsTunnel::OnConnected(loop::IoHandle upstream) {
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
  tls_ =
      std::make_unique<proxy::TlsRelay>(proxy::TlsRelay::Role::kClient, std::move(ssl),
                                        std::move(upstream), std::string(), "proxy", std::move(cb));
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
  Status s = tls_->Send(hs_.Preamble(path_->ep_.secret));
  if (!s.ok()) {
    Finish(s);
    return;
  }
  hs_.early().Watch(local_, [this] { PumpEarly(); });
}

void TlsTunnel::PumpEarly() {
  Status s = hs_.early().Pump([this](std::string_view data) -> size_t {
    return tls_->Send(data).ok() ? data.size() : 0;  // a failed session ends the tunnel anyway
  });
  if (!s.ok()) Finish(s);
}

void TlsTunnel::OnData() {
  if (relaying_) return;
  // What follows the reply line is the backend's and stays in the inbox.
  if (size_t took = hs_.Feed(tls_->inbox()); took > 0) tls_->Consume(took);
  if (!hs_.done()) {
    if (tls_->peer_done()) {
      Finish(Status::Unavailable("the proxy closed the connection during the handshake"));
    }
    return;
  }
  std::string up;
  Status s = hs_.Conclude(local_, &up, &refused_);
  if (!s.ok()) {
    Finish(s);
    return;
  }
  timer_.reset();
  if (!up.empty()) {
    if (Status sent = tls_->Send(up); !sent.ok()) {
      Finish(sent);
      return;
    }
  }
  relaying_ = true;
  tls_->Attach(std::move(local_), "local connection");
}

void TlsTunnel::Finish(Status status) {
  timer_.reset();
  hs_.Stop();
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

}  // namespace brokerproxy::proxy::client
