#include "proxy/server/admission.h"

#include "loop/log.h"

namespace brokerproxy::proxy {

namespace {

// How the connection's own log lines name it.
const char* LogName(SessionKind kind) { return kind == SessionKind::kTls ? "tls" : "session"; }

}  // namespace

Admission::Admission(Connection* conn, Client* client, SessionKind kind, Target* target)
    : conn_(conn), client_(client), target_(target), kind_(kind) {}

Admission::~Admission() = default;

void Admission::Start(const Preamble& preamble, Channel channel, bool may_complete_inline) {
  target_->job_id = preamble.job_id;
  if (channel == Channel::kPlain && !MatchesAny(proxy()->options().plain_allow, conn_->peer())) {
    // Plain preambles carry the secret in clear: only from where a tunnel ends (loopback by
    // default). Anywhere else must use TLS or SSH.
    proxy()->stats().global().denied++;
    client_->Reject(ErrorCode::kDenied, "plain preamble from a source outside plain_allow");
    return;
  }
  // The secret is checked before the throttle (Proxy::Authorize).
  Proxy::Authorization auth = proxy()->Authorize(preamble.job_id, preamble.secret, conn_);
  if (auth.error) {
    client_->Reject(*auth.error, *auth.error == ErrorCode::kBusy          ? "throttled"
                                 : *auth.error == ErrorCode::kUnavailable ? "registry view too old"
                                                                          : "denied");
    return;
  }
  *target_ = std::move(auth.target);
  dialing_ = true;
  proxy()->DialBackend(
      conn_, *target_, &dialer_, [this](Result<loop::IoHandle> r) { OnBackend(std::move(r)); },
      may_complete_inline);  // the last thing this function does
}

void Admission::OnBackend(Result<loop::IoHandle> backend) {
  dialing_ = false;
  dialer_.reset();  // its callback is running: the Dialer may go, it touches nothing after
  if (!backend.ok()) {
    LOG_DEBUG("%s %llu: backend of job %s: %s", LogName(kind_),
              static_cast<unsigned long long>(conn_->id()), target_->job_id.c_str(),
              backend.status().ToString().c_str());
    ErrorCode code = proxy()->DialFailed(backend.status());
    client_->Reject(code,
                    code == ErrorCode::kBusy ? "out of file descriptors" : "backend unavailable");
    return;
  }
  proxy()->ClearDeadline(conn_);
  client_->Connected(std::move(backend).value());
}

void Admission::OnDialDeadline() {
  dialing_ = false;
  dialer_.reset();
  proxy()->stats().global().unavailable++;
  client_->Reject(ErrorCode::kUnavailable, "backend connect timeout");
}

void Admission::Admitted() {
  if (admitted_) return;
  admitted_ = true;
  admitted_ns_ = uv_hrtime();
  proxy()->stats().SessionStarted(target_->job_id, kind_, conn_->SecondsSinceAccept());
}

void Admission::Stop() {
  dialing_ = false;
  dialer_.reset();
  if (admitted_) {
    admitted_ = false;
    proxy()->stats().SessionEnded(target_->job_id,
                                  static_cast<double>(uv_hrtime() - admitted_ns_) / 1e9);
  }
}

}  // namespace brokerproxy::proxy
