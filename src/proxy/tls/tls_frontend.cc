#include "proxy/tls/tls_frontend.h"

#include <openssl/err.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <ctime>

#include "loop/log.h"
#include "proxy/server/admission.h"
#include "proxy/server/sniffer.h"
#include "proxy/tls/client_hello.h"
#include "proxy/transport/dialer.h"
#include "proxy/transport/relay.h"
#include "proxy/transport/tls_relay.h"
#include "proxy/transport/transport.h"
#include "proxy/wire/broker1.h"

namespace brokerproxy::proxy {
namespace {

constexpr unsigned char kAlertDecodeError = 50;
constexpr unsigned char kAlertInternalError = 80;
constexpr unsigned char kAlertUnrecognizedName = 112;

class TlsConnection final : public Connection, private Admission::Client {
 public:
  TlsConnection(Proxy* proxy, std::shared_ptr<TlsSettings> settings, Handoff handoff)
      : Connection(proxy, handoff.peer),
        settings_(std::move(settings)),
        client_(std::move(handoff.client), /*is_socket=*/true),
        admission_(this, this, SessionKind::kTls, &target_) {
    set_accepted_ns(handoff.accepted_ns);
  }

  void Start() {
    proxy_->ArmDeadline(this, proxy_->options().handshake_timeout_ms);
    client_.watch()->SetCallback([this](loop::IoWatch*) { OnClientReadable(); });
    // The sniffer peeked at bytes that are still there: no new edge will announce them.
    if (client_.readable()) client_.watch()->Yield();
  }

  void Close(const char* reason) override { Finish(reason); }
  void OnDeadline() override;
  void OnSweep(uint64_t now_ms) override;

 private:
  enum class State { kHello, kDialing, kPassthrough, kHandshake, kConnecting, kRelaying, kClosed };

  void OnClientReadable();
  // One read of the ClientHello, and what it decides.
  void ReadClientHello();
  // `sni` is the ClientHello's server name, "" if it has none.
  void Route(const std::string& sni);
  void OnPassthroughBackend(Result<loop::IoHandle> backend);
  void StartTermination();
  void OnPlaintext();
  // Admission::Client: answers OK inside TLS and relays.
  void Connected(loop::IoHandle backend) override;
  void OnTlsDone(Status status);
  // Ends the connection before any TLS session exists: answers with an alert (if `alert` !=
  // 0) while the socket is still ours, closes; counts a TLS failure if `tls_failure`.
  void FailHello(const char* reason, unsigned char alert, bool tls_failure = true);
  // Admission::Client, and refusals of its own. Inside TLS: "ERR <code>\n", close_notify, close.
  void Reject(ErrorCode code, const char* reason) override;
  void CountTlsFailure() { proxy_->stats().global().tls_failures++; }
  void StartSplicing();
  void FlushCounters();
  void Finish(const char* reason);
  uint64_t Up() const;
  uint64_t Down() const;

  std::shared_ptr<TlsSettings> settings_;
  State state_ = State::kHello;
  bool finished_ = false;
  bool spliced_ = false;
  bool ok_held_ = false;  // the OK record waits in the kernel for the backend's first bytes
  const char* mode_ = "-";
  EdgeSocket client_;  // until TLS or the relay takes it
  std::string hello_;  // the ClientHello bytes, carried forward
  ClientHelloReader reader_;
  PreambleReader preamble_;  // inside TLS; nothing is consumed from the inbox before kDone
  size_t preamble_fed_ = 0;  // bytes of the inbox fed to it
  Target target_;
  std::unique_ptr<Dialer> dialer_;  // passthrough
  Admission admission_;             // termination: the preamble's secret, then the backend
  std::unique_ptr<Relay> relay_;    // passthrough
  std::unique_ptr<TlsRelay> tls_;   // termination
  ByteReport bytes_;                // what of the counters went to the stats already
};

void TlsConnection::OnClientReadable() {
  // Edge-triggered: read until the socket is empty (EdgeSocket clears the flag) or the reader
  // decides.
  while (state_ == State::kHello && client_.readable()) ReadClientHello();
}

void TlsConnection::ReadClientHello() {
  char buf[4096];
  size_t room = kMaxClientHelloBuffer - hello_.size();
  ssize_t n = client_.Read(buf, std::min(room, sizeof(buf)));
  if (n == -EAGAIN) return;  // the flag is cleared: the next edge brings us back
  if (n < 0) {
    CountTlsFailure();
    Finish("client error during ClientHello");
    return;
  }
  if (n == 0) {
    CountTlsFailure();
    Finish("client closed during ClientHello (truncated)");
    return;
  }
  hello_.append(buf, static_cast<size_t>(n));
  // Only the new bytes are examined: the reader remembers where it is (client_hello.h).
  switch (reader_.Feed(std::string_view(buf, static_cast<size_t>(n)))) {
    case ClientHelloReader::Verdict::kNeedMore:
      return;  // the reader refuses a hello that does not end within the buffer's bound
    case ClientHelloReader::Verdict::kNotTls:
    case ClientHelloReader::Verdict::kMalformed:
    case ClientHelloReader::Verdict::kTooLarge:
      LOG_DEBUG("tls %llu: bad ClientHello: %s", static_cast<unsigned long long>(id()),
                reader_.error());
      proxy_->stats().global().bad_request++;
      FailHello("malformed ClientHello", kAlertDecodeError);
      return;
    case ClientHelloReader::Verdict::kSni:
    case ClientHelloReader::Verdict::kNoSni:
      Route(reader_.verdict() == ClientHelloReader::Verdict::kSni ? reader_.sni() : "");
      return;
  }
}

void TlsConnection::Route(const std::string& sni) {
  // The rest waits in the socket until we know where it goes (the flags keep its readiness).
  client_.watch()->SetCallback(nullptr);
  const std::string& domain = settings_->domain;
  const auto& own = settings_->proxy_names;
  // The proxy's own names are never a job's, even if a job id spells one (a job "login" under
  // domain "example.org" must not capture connections to login.example.org).
  bool proxy_name = !sni.empty() && std::find(own.begin(), own.end(), sni) != own.end();
  if (!proxy_name && sni.size() > domain.size() + 1 && sni.ends_with(domain) &&
      sni[sni.size() - domain.size() - 1] == '.') {
    std::string job_id = sni.substr(0, sni.size() - domain.size() - 1);
    const registry::Job* job = proxy_->registry().Find(job_id);
    // A view too old to trust (registry/redis_store.h) routes nobody.
    bool live = job &&
                (job->expires == 0 || job->expires > static_cast<int64_t>(::time(nullptr))) &&
                proxy_->registry().refusal().empty();
    if (live && job->type == registry::JobType::kSsl) {
      target_.job_id = job->id;
      target_.owner = job->owner;
      target_.type = job->type;
      target_.owner = job->owner;
      target_.host = job->host;
      target_.port = job->port;
      // What the dial finds feeds the job's state (Proxy::set_dial_observer) for this record.
      target_.generation = proxy_->registry().Generation(job->id);
      mode_ = "passthrough";
      state_ = State::kDialing;
      proxy_->EndHandshake(this);  // the job's service authenticates its clients itself
      proxy_->DialBackend(this, target_, &dialer_,
                          [this](Result<loop::IoHandle> r) { OnPassthroughBackend(std::move(r)); });
      return;
    }
    LOG_DEBUG("tls %llu: no ssl job for server name %s", static_cast<unsigned long long>(id()),
              LogSafe(sni).c_str());
    mode_ = "refused";
    FailHello("no ssl job for this server name", kAlertUnrecognizedName);
    return;
  }
  StartTermination();
}

void TlsConnection::OnPassthroughBackend(Result<loop::IoHandle> backend) {
  if (!backend.ok()) {
    LOG_DEBUG("tls %llu: backend of job %s: %s", static_cast<unsigned long long>(id()),
              target_.job_id.c_str(), backend.status().ToString().c_str());
    ErrorCode code = proxy_->DialFailed(backend.status());
    FailHello(code == ErrorCode::kBusy ? "out of file descriptors" : "backend unavailable",
              kAlertInternalError, /*tls_failure=*/false);
    return;
  }
  proxy_->ClearDeadline(this);
  // Raw bytes both ways from here, spliced.
  state_ = State::kPassthrough;
  StartSplicing();
  relay_ = std::make_unique<Relay>(proxy_->pipes(), Relay::Side{std::move(client_.handle())},
                                   Relay::Side{std::move(backend).value()}, "client", "backend",
                                   std::string(), std::move(hello_), [this](Status s) {
                                     std::string reason = s.ok() ? "done" : s.message();
                                     Finish(reason.c_str());
                                   });
  relay_->Start();
  dialer_.reset();  // its callback is running: it touches nothing after
}

void TlsConnection::StartTermination() {
  mode_ = "terminated";
  ERR_clear_error();
  SslPtr ssl(SSL_new(settings_->server_ctx.get()));
  if (!ssl) {
    Status s = SslError("SSL_new");
    LOG_WARN("tls %llu: %s", static_cast<unsigned long long>(id()), s.ToString().c_str());
    FailHello("cannot create a TLS session", kAlertInternalError);
    return;
  }
  // TLS on the same reactor socket (the ClientHello read so far goes
  // to OpenSSL first).
  state_ = State::kHandshake;
  TlsRelay::Callbacks cb;
  cb.on_data = [this] { OnPlaintext(); };
  cb.on_done = [this](Status s) { OnTlsDone(std::move(s)); };
  tls_ = std::make_unique<TlsRelay>(TlsRelay::Role::kServer, std::move(ssl),
                                    std::move(client_.handle()), std::move(hello_), "client",
                                    std::move(cb));
  tls_->Start();
}

void TlsConnection::OnPlaintext() {
  if (state_ != State::kHandshake) return;  // later bytes wait in the inbox for the backend
  // Only what arrived since the last call is examined: the reader remembers where it is.
  std::string_view inbox = tls_->inbox();
  preamble_.Feed(inbox.substr(std::min(preamble_fed_, inbox.size())));
  preamble_fed_ = inbox.size();
  const Preamble& p = preamble_.result();
  switch (p.state) {
    case Preamble::State::kNeedMore:
      if (tls_->peer_done()) {
        // E.g. a client that completed the handshake, then rejected the certificate's name.
        CountTlsFailure();
        Finish("client closed before the preamble");
      }
      return;
    case Preamble::State::kBad:
      LOG_DEBUG("tls %llu: bad preamble: %s", static_cast<unsigned long long>(id()), p.error);
      proxy_->RecordSourceFailure(*this, "bad preamble");
      Reject(ErrorCode::kBadRequest, "bad preamble");
      return;
    case Preamble::State::kDone: {
      Preamble line = preamble_.Take();  // the secret is kept no longer than needed
      tls_->Consume(line.length);
      state_ = State::kConnecting;
      // No plain_allow check: inside TLS the secret is encrypted, so any source may send it.
      admission_.Start(line, Admission::Channel::kTls, /*may_complete_inline=*/false);
      return;
    }
  }
}

void TlsConnection::Connected(loop::IoHandle backend) {
  // As on the plain path (Session::Connected): a client with bytes behind its preamble waits
  // for the answer, so its OK record leaves with the backend's first bytes, or alone after
  // held_ok_ms.
  int64_t hold_ms = proxy_->options().held_ok_ms;
  ok_held_ = !tls_->inbox().empty() && hold_ms > 0;
  if (ok_held_) proxy_->ArmDeadline(this, hold_ms);
  Status s = tls_->Send(kReplyOk, ok_held_);
  if (!s.ok()) {
    std::string reason = s.message();
    Finish(reason.c_str());
    return;
  }
  state_ = State::kRelaying;
  StartSplicing();
  tls_->Attach(Relay::Side{std::move(backend)}, "backend", proxy_->pipes());
}

void TlsConnection::OnTlsDone(Status status) {
  if (!tls_->handshake_done()) {
    CountTlsFailure();
    LOG_DEBUG("tls %llu: %s", static_cast<unsigned long long>(id()), status.ToString().c_str());
  }
  std::string reason = status.ok() ? "done" : status.message();
  Finish(reason.c_str());
}

void TlsConnection::StartSplicing() {
  spliced_ = true;
  admission_.Admitted();  // counted like a plain session's, passthrough too
}

void TlsConnection::FailHello(const char* reason, unsigned char alert, bool tls_failure) {
  if (tls_failure) CountTlsFailure();
  if (client_.open()) {
    int fd = client_.handle().Release();
    if (alert != 0) SendBestEffort(fd, TlsAlertRecord(alert));
    CloseGracefully(fd);
  }
  Finish(reason);
}

void TlsConnection::Reject(ErrorCode code, const char* reason) {
  GlobalCounters& g = proxy_->stats().global();
  if (code == ErrorCode::kBadRequest) g.bad_request++;
  if (code == ErrorCode::kTimeout) g.timeouts++;
  if (tls_) tls_->Abort(ErrorReply(code));
  std::string why = std::string(ErrorCodeName(code)) + ": " + reason;
  Finish(why.c_str());
}

void TlsConnection::OnDeadline() {
  switch (state_) {
    case State::kHello:
      proxy_->stats().global().timeouts++;
      proxy_->RecordSourceFailure(*this, "handshake timeout");
      FailHello("ClientHello timeout", 0);
      return;
    case State::kHandshake:
      if (!tls_->handshake_done()) {
        proxy_->stats().global().timeouts++;
        CountTlsFailure();
        proxy_->RecordSourceFailure(*this, "handshake timeout");
        tls_->Abort("");
        Finish("TLS handshake timeout");
        return;
      }
      proxy_->RecordSourceFailure(*this, "handshake timeout");
      Reject(ErrorCode::kTimeout, "preamble timeout");
      return;
    case State::kDialing:
      proxy_->stats().global().unavailable++;
      FailHello("backend connect timeout", kAlertInternalError, /*tls_failure=*/false);
      return;
    case State::kConnecting:
      admission_.OnDialDeadline();
      return;
    case State::kRelaying:
      if (ok_held_) tls_->ReleaseHeld();
      ok_held_ = false;
      return;
    case State::kPassthrough:
    case State::kClosed:
      return;
  }
}

uint64_t TlsConnection::Up() const {
  if (relay_) return relay_->counters().a_to_b;
  if (tls_) return tls_->counters().tls_to_plain;
  return 0;
}

uint64_t TlsConnection::Down() const {
  if (relay_) return relay_->counters().b_to_a;
  if (tls_) return tls_->counters().plain_to_tls;
  return 0;
}

void TlsConnection::FlushCounters() {
  if (!spliced_) return;
  bytes_.Flush(&proxy_->stats(), target_.job_id, Up(), Down());
}

void TlsConnection::OnSweep(uint64_t now_ms) {
  if (state_ != State::kPassthrough && state_ != State::kRelaying) return;
  FlushCounters();
  uint64_t last = relay_ ? relay_->last_activity_ms() : tls_->last_activity_ms();
  bool half = relay_ ? relay_->half_closed() : tls_->half_closed();
  uint64_t idle = now_ms > last ? now_ms - last : 0;
  const ProxyOptions& o = proxy_->options();
  if (o.idle_timeout_ms > 0 && idle >= static_cast<uint64_t>(o.idle_timeout_ms)) {
    proxy_->stats().global().idle_closed++;
    Close("idle timeout");
    return;
  }
  if (half && o.half_close_timeout_ms > 0 &&
      idle >= static_cast<uint64_t>(o.half_close_timeout_ms)) {
    proxy_->stats().global().idle_closed++;
    Close("half-close timeout");
  }
}

void TlsConnection::Finish(const char* reason) {
  if (finished_) return;
  finished_ = true;
  state_ = State::kClosed;
  proxy_->ClearDeadline(this);
  FlushCounters();
  uint64_t up = Up(), down = Down();
  admission_.Stop();  // the job's active count, if spliced; a dial in progress
  // Release the sockets now (fds are precious); the object itself goes on a later turn.
  relay_.reset();
  tls_.reset();
  dialer_.reset();
  client_.Close();
  uint64_t ms = proxy_->loop()->Now() - started_ms();
  LOG_INFO("tls %llu job=%s peer=%s mode=%s up=%llu down=%llu duration=%llu.%03llus reason=%s",
           static_cast<unsigned long long>(id()),
           target_.job_id.empty() ? "-" : target_.job_id.c_str(), PeerString().c_str(), mode_,
           static_cast<unsigned long long>(up), static_cast<unsigned long long>(down),
           static_cast<unsigned long long>(ms / 1000), static_cast<unsigned long long>(ms % 1000),
           reason);
  proxy_->Retire(this);
}

}  // namespace

std::string TlsAlertRecord(unsigned char description) {
  // ContentType alert(21), legacy_record_version 3.3, length 2, level fatal(2), description.
  const char record[] = {21, 3, 3, 0, 2, 2, static_cast<char>(description)};
  return std::string(record, sizeof(record));
}

Frontend NewTlsFrontend(std::shared_ptr<TlsSettings> settings) {
  return [settings](Proxy* proxy, Handoff handoff) -> std::unique_ptr<Connection> {
    auto conn = std::make_unique<TlsConnection>(proxy, settings, std::move(handoff));
    // Only arms a deadline and a poll: nothing calls back before the proxy adopts it.
    conn->Start();
    return conn;
  };
}

}  // namespace brokerproxy::proxy
