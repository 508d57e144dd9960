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

// Longest reply line the proxy sends ("ERR unavailable\n" is 16 bytes).
constexpr size_t kMaxReplyLine = 128;

class TlsPath;

class TlsTunnel final : public Tunnel {
 public:
  TlsTunnel(TlsPath* path, proxy::Relay::Side local, ProxyPath::Done done);
  void Start();

 private:
  void OnConnected(Result<loop::IoHandle> upstream);
  void OnHandshake();
  void OnData();
  void Finish(Status status);

  TlsPath* path_;
  proxy::Relay::Side local_;
  ProxyPath::Done done_;
  proxy::Dialer dialer_;
  loop::HandlePtr<loop::Timer> timer_;
  std::unique_ptr<proxy::TlsRelay> tls_;
  bool relaying_ = false;
};

class TlsPath final : public ProxyPath {
 public:
  TlsPath(loop::Reactor* reactor, proxy::SslCtxPtr ctx, std::string host, int port, std::string job,
          std::string secret, int64_t timeout_ms)
      : loop_(&reactor->loop()),
        reactor_(reactor),
        ctx_(std::move(ctx)),
        resolver_(loop_, 60000),
        host_(std::move(host)),
        port_(port),
        job_(std::move(job)),
        secret_(std::move(secret)),
        timeout_ms_(timeout_ms) {}

  std::unique_ptr<Tunnel> Open(proxy::Relay::Side local, Done done) override {
    auto t = std::make_unique<TlsTunnel>(this, std::move(local), std::move(done));
    t->Start();
    return t;
  }
  std::string Describe() const override {
    return "TLS to " + (host_.find(':') != std::string::npos ? "[" + host_ + "]" : host_) + ":" +
           std::to_string(port_);
  }

  loop::Loop* loop_;
  loop::Reactor* reactor_;
  proxy::SslCtxPtr ctx_;
  proxy::ResolveCache resolver_;
  std::string host_;
  int port_;
  std::string job_;
  std::string secret_;
  int64_t timeout_ms_;
};

TlsTunnel::TlsTunnel(TlsPath* path, proxy::Relay::Side local, ProxyPath::Done done)
    : path_(path),
      local_(std::move(local)),
      done_(std::move(done)),
      dialer_(path->reactor_, &path->resolver_) {}

void TlsTunnel::Start() {
  auto t = loop::Timer::Create(*path_->loop_);
  if (t.ok()) {
    timer_ = std::move(t).value();
    timer_->Start(static_cast<uint64_t>(path_->timeout_ms_), [this] {
      Finish(Status::Timeout("no TLS session with the proxy at " + path_->Describe() + " within " +
                             std::to_string(path_->timeout_ms_ / 1000) + "s"));
    });
  }
  dialer_.Dial(path_->host_, path_->port_,
               [this](Result<loop::IoHandle> r) { OnConnected(std::move(r)); });
}

void TlsTunnel::OnConnected(Result<loop::IoHandle> io) {
  if (!io.ok()) {
    Finish(Status::Unavailable("cannot reach the proxy: " + io.status().message()));
    return;
  }
  // TLS moves bytes in user space, on a level-triggered poll.
  auto upstream = proxy::ToPoll(*path_->loop_, std::move(io).value());
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
  Status s = proxy::SetClientPeerName(ssl.get(), path_->host_);
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
  Status s = tls_->Send(PreambleLine(path_->job_, path_->secret_));
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
  Status s = StatusFromReply(line, path_->job_);
  if (!s.ok()) {
    Finish(s);
    return;
  }
  timer_.reset();
  relaying_ = true;
  auto local = proxy::ToPolls(*path_->loop_, std::move(local_));
  if (!local.ok()) {
    Finish(local.status());
    return;
  }
  tls_->Attach(std::move(local).value(), "local connection");
}

void TlsTunnel::Finish(Status status) {
  timer_.reset();
  if (tls_ && !relaying_) tls_->Abort("");
  ProxyPath::Done done = std::move(done_);
  if (done) done(std::move(status));  // may destroy this
}

}  // namespace

std::unique_ptr<ProxyPath> NewTlsPath(loop::Reactor* reactor, proxy::SslCtxPtr ctx,
                                      std::string host, int port, std::string job,
                                      std::string secret, int64_t handshake_timeout_ms) {
  return std::make_unique<TlsPath>(reactor, std::move(ctx), std::move(host), port, std::move(job),
                                   std::move(secret), handshake_timeout_ms);
}

}  // namespace brokerproxy::cli
