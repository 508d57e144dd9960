#include "proxy/ssh/ssh_server.h"

#include <unistd.h>

#include <cstring>

#include <libssh/callbacks.h>

#include "loop/log.h"
#include "loop/timer.h"

namespace brokerproxy::proxy {
namespace {

// Modern algorithms only (as OpenSSH 9 prefers them). No diffie-hellman-group-exchange: it
// would make libssh read /etc/ssh/moduli, blocking, on the loop thread.
constexpr const char* kKex =
    "curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,"
    "ecdh-sha2-nistp521";
constexpr const char* kCiphers =
    "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,"
    "aes192-ctr,aes128-ctr";
constexpr const char* kMacs =
    "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,hmac-sha2-256,hmac-sha2-512";
// The software version in our identification string: "SSH-2.0-brokerproxy".
constexpr const char* kBanner = "brokerproxy";
// Messages taken per TakeMessages() call. ssh_message_get() reads from the socket whenever the
// queue is empty, so without a bound a client that keeps sending requests would keep the loop.
constexpr int kMaxMessages = 64;

const char* ChannelTypeName(int subtype) {
  switch (subtype) {
    case SSH_CHANNEL_SESSION:
      return "session";
    case SSH_CHANNEL_DIRECT_TCPIP:
      return "direct-tcpip";
    case SSH_CHANNEL_FORWARDED_TCPIP:
      return "forwarded-tcpip";
    case SSH_CHANNEL_X11:
      return "x11";
    case SSH_CHANNEL_AUTH_AGENT:
      return "auth-agent";
    default:
      return "unknown";
  }
}

}  // namespace

// ---- SshEndpoint ----

Result<std::unique_ptr<SshEndpoint>> SshEndpoint::Create(SshEndpointOptions options) {
  auto key = LoadOrCreateHostKey(options.host_key_path);
  if (!key.ok()) return key.status();
  auto fingerprint = SshFingerprint(key->get());
  if (!fingerprint.ok()) return fingerprint.status();
  char* b64 = nullptr;
  if (ssh_pki_export_pubkey_base64(key->get(), &b64) != SSH_OK || b64 == nullptr) {
    return Status::Internal("ssh: cannot export the host key");
  }
  std::string public_key = std::string(ssh_key_type_to_char(ssh_key_type(key->get()))) + " " + b64;
  ssh_string_free_char(b64);
  SshBindPtr bind(ssh_bind_new());
  if (!bind) return Status::Internal("ssh_bind_new failed");
  bool no = false;
  struct StringOption {
    ssh_bind_options_e option;
    const char* value;
  };
  const StringOption strings[] = {
      {SSH_BIND_OPTIONS_BANNER, kBanner},
      {SSH_BIND_OPTIONS_KEY_EXCHANGE, kKex},
      {SSH_BIND_OPTIONS_CIPHERS_C_S, kCiphers},
      {SSH_BIND_OPTIONS_CIPHERS_S_C, kCiphers},
      {SSH_BIND_OPTIONS_HMAC_C_S, kMacs},
      {SSH_BIND_OPTIONS_HMAC_S_C, kMacs},
      {SSH_BIND_OPTIONS_HOSTKEY_ALGORITHMS, "ssh-ed25519"},
  };
  // Not the system-wide libssh server config: our policy is fixed here.
  if (ssh_bind_options_set(bind.get(), SSH_BIND_OPTIONS_PROCESS_CONFIG, &no) != SSH_OK) {
    return Status::Internal("ssh bind: cannot disable the global config");
  }
  for (const StringOption& o : strings) {
    if (ssh_bind_options_set(bind.get(), o.option, o.value) != SSH_OK) {
      return Status::Internal(std::string("ssh bind option: ") +
                              ssh_get_error(static_cast<void*>(bind.get())));
    }
  }
  // IMPORT_KEY takes ownership of the key: libssh stores the pointer and frees it.
  if (ssh_bind_options_set(bind.get(), SSH_BIND_OPTIONS_IMPORT_KEY, key->get()) != SSH_OK) {
    return Status::Internal("ssh bind: cannot use the host key");
  }
  (void)key->release();
  return std::unique_ptr<SshEndpoint>(new SshEndpoint(
      std::move(options), std::move(bind), std::move(fingerprint).value(), std::move(public_key)));
}

Frontend SshEndpoint::frontend() {
  return [this](Proxy* proxy, Handoff handoff) -> std::unique_ptr<Connection> {
    auto session = std::make_unique<SshSession>(proxy, handoff.peer, &options_);
    session->set_accepted_ns(handoff.accepted_ns);
    Status s = session->Start(bind_.get(), std::move(handoff.client));
    if (!s.ok()) {
      proxy->stats().global().ssh_failures++;
      LOG_WARN("ssh: cannot start a session for %s: %s", session->PeerString().c_str(),
               s.ToString().c_str());
      return nullptr;
    }
    return session;
  };
}

// ---- SshSession ----

SshSession::SshSession(Proxy* proxy, const sockaddr_storage& peer,
                       const SshEndpointOptions* options)
    : Connection(proxy, peer), options_(options) {}

SshSession::~SshSession() {
  // Normally Close() already released everything; this covers a failed Start().
  channels_.clear();
  transport_.reset();
}

Status SshSession::Start(ssh_bind bind, loop::IoHandle client) {
  last_activity_ms_ = proxy_->loop()->Now();
  // The fd is libssh's from here on; the transport watches a duplicate of it (SshTransport).
  int fd = client.Release();
  SshSessionPtr session(ssh_new());
  if (!session) {
    ::close(fd);
    return Status::Internal("ssh_new failed");
  }
  if (ssh_bind_accept_fd(bind, session.get(), fd) != SSH_OK) {
    std::string err = ssh_get_error(static_cast<void*>(bind));
    bool owned = ssh_get_fd(session.get()) == fd;  // else ssh_free() will not close it
    session.reset();
    if (!owned) ::close(fd);
    return Status::Internal("ssh_bind_accept_fd: " + err);
  }
  ssh_set_blocking(session.get(), 0);
  ssh_set_auth_methods(session.get(), SSH_AUTH_METHOD_PASSWORD | SSH_AUTH_METHOD_INTERACTIVE);
  // No server or message callback: every message (authentication, channel opens, requests)
  // queues in the session for TakeMessages(), so a channel open can be answered later.
  int rc = ssh_handle_key_exchange(session.get());  // sends our banner; SSH_AGAIN expected
  if (rc == SSH_ERROR) return SshError(session.get(), "ssh key exchange");
  auto transport = SshTransport::Create(std::move(session), *proxy_->reactor());
  if (!transport.ok()) return transport.status();
  transport_ = std::move(transport).value();
  auto timer = loop::Timer::Create(*proxy_->loop());
  if (!timer.ok()) return timer.status();
  pause_timer_ = std::move(timer).value();
  auto more = loop::Timer::Create(*proxy_->loop());
  if (!more.ok()) return more.status();
  more_timer_ = std::move(more).value();
  proxy_->ArmDeadline(this, proxy_->options().handshake_timeout_ms);
  transport_->Start([this] { OnSocket(); });
  return Status::OK();
}

// ---- messages: taken from the session's queue, outside libssh ----

void SshSession::TakeMessages() {
  // Paused: ssh_message_get() would read from the socket when the queue is empty.
  for (int i = 0; transport_ && !transport_->paused() && transport_->alive(); ++i) {
    if (i == kMaxMessages) {
      // What is left may already be queued (no socket event would come for it).
      if (more_timer_ && !more_timer_->active()) {
        more_timer_->Start(0, [this] { Service(); });
      }
      return;
    }
    SshMessagePtr msg(ssh_message_get(transport_->session()));
    if (!msg) return;  // the queue is empty and nothing more was readable
    if (HandleMessage(msg) != 0 && msg) (void)ssh_message_reply_default(msg.get());
  }
}

int SshSession::HandleMessage(SshMessagePtr& msg) {
  if (state_ == State::kClosed || close_reason_) return 1;
  switch (ssh_message_type(msg.get())) {
    case SSH_REQUEST_AUTH:
      return HandleAuth(msg.get());
    case SSH_REQUEST_CHANNEL_OPEN:
      return HandleChannelOpen(msg);
    case SSH_REQUEST_CHANNEL:
      LOG_INFO("ssh %llu job=%s: refused a channel request (only direct-tcpip is served)",
               static_cast<unsigned long long>(id()), target_.job_id.c_str());
      return Refuse("shell refused: only port forwards to the job are served");
    case SSH_REQUEST_GLOBAL:
      LOG_INFO("ssh %llu job=%s: refused a global request (remote forwarding is not served)",
               static_cast<unsigned long long>(id()),
               target_.job_id.empty() ? "-" : target_.job_id.c_str());
      return Refuse("remote forwarding refused: only port forwards to the job are served");
    default:
      return 1;
  }
}

int SshSession::HandleAuth(ssh_message msg) {
  if (state_ != State::kHandshake) return 1;
  switch (ssh_message_subtype(msg)) {
    case SSH_AUTH_METHOD_INTERACTIVE: {
      if (!ssh_message_auth_kbdint_is_response(msg)) {
        const char* user = ssh_message_auth_user(msg);
        // Only a well-formed job id is kept (CheckSecret refuses anything else).
        kbdint_user_ = user && registry::ValidJobId(user) ? user : "";
        // "Password": what tools that type a password (sshpass) wait for.
        const char* prompts[] = {"Password (job secret): "};
        char echo[] = {0};
        // No name or instruction: OpenSSH would print them on every attempt.
        if (ssh_message_auth_interactive_request(msg, "", "", 1, prompts, echo) != SSH_OK) {
          return 1;
        }
        return 0;
      }
      ssh_session s = transport_ ? transport_->session() : nullptr;
      const char* answer = nullptr;
      if (s && ssh_userauth_kbdint_getnanswers(s) == 1) {
        answer = ssh_userauth_kbdint_getanswer(s, 0);
      }
      if (CheckSecret(kbdint_user_, answer)) {
        ssh_message_auth_reply_success(msg, 0);
      } else {
        ssh_message_reply_default(msg);  // USERAUTH_FAILURE
      }
      return 0;
    }
    case SSH_AUTH_METHOD_PASSWORD: {
      const char* user = ssh_message_auth_user(msg);
      // Deprecated in favour of the server callback, which cannot be used here: with a server
      // callback set, libssh 0.10 queues no message (see "messages" in ssh_server.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
      const char* password = ssh_message_auth_password(msg);
#pragma GCC diagnostic pop
      if (CheckSecret(user ? user : "", password)) {
        ssh_message_auth_reply_success(msg, 0);
      } else {
        ssh_message_reply_default(msg);  // USERAUTH_FAILURE
      }
      return 0;
    }
    default:
      return 1;  // "none", publickey, ...: refused, listing password and keyboard-interactive
  }
}

bool SshSession::CheckSecret(const std::string& user, const char* secret) {
  // The user name is the peer's choice: anything but a job id goes no further (no throttle key
  // made of it, no log line with it).
  bool valid_user = registry::ValidJobId(user);
  Proxy::Authorization auth;
  if (valid_user) {
    auth = proxy_->Authorize(user, secret ? secret : "", this);
  } else {
    proxy_->stats().global().denied++;
    proxy_->RecordSourceFailure(*this, "ssh user name that is not a job id");
    auth.error = ErrorCode::kDenied;
  }
  if (!auth.error) {
    target_ = std::move(auth.target);
    state_ = State::kAuthenticated;
    proxy_->ClearDeadline(this);
    LOG_DEBUG("ssh %llu job=%s peer=%s: authenticated", static_cast<unsigned long long>(id()),
              target_.job_id.c_str(), PeerString().c_str());
    return true;
  }
  proxy_->stats().global().ssh_failures++;
  ++auth_failures_;
  LOG_DEBUG("ssh %llu peer=%s: authentication as '%s' refused (%s), failure %d",
            static_cast<unsigned long long>(id()), PeerString().c_str(),
            valid_user ? user.c_str() : "(not a job id)", ErrorCodeName(*auth.error),
            auth_failures_);
  if (auth_failures_ >= options_->max_auth_failures) {
    RequestClose("too many authentication failures");
    return false;
  }
  // libssh answers at once and has no limit of its own (docs/libraries.md, "Authentication"):
  // slow the next guess down by not reading from this client for a while.
  if (pause_timer_ && options_->auth_failure_pause_ms > 0) {
    transport_->SetPaused(true);
    pause_timer_->Start(static_cast<uint64_t>(options_->auth_failure_pause_ms) * auth_failures_,
                        [this] {
                          if (state_ == State::kClosed || !transport_) return;
                          transport_->SetPaused(false);
                          Service();
                        });
  }
  return false;
}

int SshSession::HandleChannelOpen(SshMessagePtr& open) {
  ssh_message msg = open.get();
  int subtype = ssh_message_subtype(msg);
  if (state_ != State::kAuthenticated) return 1;
  if (subtype != SSH_CHANNEL_DIRECT_TCPIP) {
    LOG_INFO("ssh %llu job=%s: refused a %s channel (only direct-tcpip is served)",
             static_cast<unsigned long long>(id()), target_.job_id.c_str(),
             ChannelTypeName(subtype));
    return Refuse(subtype == SSH_CHANNEL_SESSION
                      ? "shell refused: only port forwards to the job are served "
                        "(ssh -N -L PORT:JOB:1)"
                      : "channel refused: only port forwards to the job are served");
  }
  const char* dest = ssh_message_channel_request_open_destination(msg);
  if (dest == nullptr || target_.job_id != registry::CanonicalJobId(dest)) {
    std::string shown = LogSafe(dest ? dest : "");
    LOG_INFO("ssh %llu job=%s: refused a forward to '%s' (the destination must be the job id)",
             static_cast<unsigned long long>(id()), target_.job_id.c_str(), shown.c_str());
    return Refuse("not this job: the destination must be the job id (ssh -L PORT:JOB:1)");
  }
  if (!proxy_->StillCurrent(target_)) {
    // The secret this session proved is no longer the job's (removed, or saved anew).
    RequestClose("job removed or replaced");
    return Refuse("the job was removed or saved again");
  }
  if (channels_.size() >= static_cast<size_t>(options_->max_channels)) {
    LOG_INFO("ssh %llu job=%s: refused a channel: %d already open",
             static_cast<unsigned long long>(id()), target_.job_id.c_str(), options_->max_channels);
    return Refuse("too many channels open in this session");
  }
  size_t dialing = 0;
  for (const auto& c : channels_) dialing += c->dialer ? 1 : 0;
  if (dialing >= static_cast<size_t>(options_->max_dialing_channels)) {
    LOG_INFO("ssh %llu job=%s: refused a channel: %zu still connecting to the backend",
             static_cast<unsigned long long>(id()), target_.job_id.c_str(), dialing);
    return Refuse("too many channels of this session still connecting to the job");
  }
  if (!proxy_->TakeChannelSlot()) {
    LOG_INFO("ssh %llu job=%s: refused a channel: the proxy is at max_connections",
             static_cast<unsigned long long>(id()), target_.job_id.c_str());
    return Refuse("the proxy is busy (max_connections)");
  }
  // The open stays unanswered while the backend is dialed (OnBackend accepts or refuses it,
  // OnSweep refuses it after connect_timeout): the client learns of a service that is down as
  // a refused channel.
  auto c = std::make_unique<Channel>();
  c->slot = true;
  c->id = next_channel_id_++;
  uint64_t cid = c->id;
  c->open = std::move(open);
  c->dialer = proxy_->NewDialer(target_);
  c->dial_started_ms = proxy_->loop()->Now();
  c->dialer->Dial(target_.host, target_.port,
                  [this, cid](Result<loop::IoHandle> r) { OnBackend(cid, std::move(r)); });
  channels_.push_back(std::move(c));
  return 0;
}

void SshSession::RefusePending(Channel& c, const char* reason) {
  c.dialer.reset();
  c.refused = true;
  if (!c.open) return;
  Tell(reason);
  (void)ssh_message_reply_default(c.open.get());  // SSH_MSG_CHANNEL_OPEN_FAILURE
  c.open.reset();
}

void SshSession::Tell(const char* reason) {
  if (transport_) (void)ssh_send_debug(transport_->session(), reason, /*always_display=*/1);
}

int SshSession::Refuse(const char* reason) {
  Tell(reason);
  return 1;
}

void SshSession::RequestClose(const char* reason) {
  if (!close_reason_) close_reason_ = reason;
}

// ---- entry points from the loop ----

void SshSession::OnSocket() {
  if (state_ == State::kClosed) return;
  Service();
}

void SshSession::OnBackend(uint64_t channel_id, Result<loop::IoHandle> backend) {
  Channel* c = FindChannel(channel_id);
  if (c == nullptr || state_ == State::kClosed) return;
  // Not inside libssh (a loop callback): the held open can be answered here.
  if (!backend.ok()) {
    proxy_->DialFailed(backend.status());  // counted like a connection's failed dial
    LOG_INFO("ssh %llu job=%s: backend unavailable: %s", static_cast<unsigned long long>(id()),
             target_.job_id.c_str(), backend.status().message().c_str());
    // Resets the Dialer: its callback is running, and it touches nothing after.
    RefusePending(*c, "the job's service is not accepting connections");
    Service();
    return;
  }
  c->dialer.reset();  // as above
  ssh_channel channel = ssh_message_channel_request_open_reply_accept(c->open.get());
  c->open.reset();
  if (channel == nullptr) {
    c->refused = true;  // the session is failing; Service() will see it (backend closes here)
    Service();
    return;
  }
  ++channels_opened_;
  c->splice = std::make_unique<ChannelSplice>(
      channel, [this] { Service(); }, proxy_->pipes());
  // A channel is a session of its own; its handshake ran from the TCP accept (key exchange and
  // authentication included) to this channel's backend.
  proxy_->stats().SessionStarted(target_.job_id, SessionKind::kSsh, SecondsSinceAccept());
  c->counted = true;
  c->started_ns = uv_hrtime();
  // The backend stays in the reactor, where the Dialer registered it.
  c->splice->Attach(std::move(backend).value(), loop::IoHandle(), std::string(), std::string());
  Service();
}

SshSession::Channel* SshSession::FindChannel(uint64_t id) {
  for (auto& c : channels_) {
    if (c->id == id) return c.get();
  }
  return nullptr;
}

void SshSession::Service() {
  // Never re-entered: libssh callbacks do not call it, and entry points come from the loop.
  if (state_ == State::kClosed || in_service_ || !transport_) return;
  in_service_ = true;
  if (!transport_->Process([this] { TakeMessages(); }).ok()) TransportEnded();
  if (!close_reason_) {
    for (size_t i = 0; i < channels_.size(); ++i) {
      if (channels_[i]->splice) channels_[i]->splice->Service();
    }
    // The channels' libssh calls process packets too: take what they queued (this may add
    // pending channels).
    TakeMessages();
  }
  if (!close_reason_) {
    for (size_t i = 0; i < channels_.size();) {
      Channel& c = *channels_[i];
      if (c.splice ? !c.splice->finished() : !c.refused) {
        ++i;
        continue;
      }
      std::unique_ptr<Channel> done = std::move(channels_[i]);
      channels_.erase(channels_.begin() + static_cast<long>(i));
      EndChannel(*done);
      done.reset();  // frees the channel: libssh may process packets (callbacks) in there
    }
  }
  in_service_ = false;
  // The session may also have failed outside Process(): TakeMessages() reads from the socket
  // when the queue is empty (a bad banner during the key exchange fails it there).
  if (!transport_->alive()) TransportEnded();
  if (close_reason_) Close(close_reason_);
}

void SshSession::TransportEnded() {
  if (close_reason_) return;
  close_reason_ =
      state_ == State::kHandshake ? "key exchange or authentication failed" : "client disconnected";
  // A failed key exchange counts here; failed passwords were counted one by one.
  if (state_ == State::kHandshake && auth_failures_ == 0) proxy_->stats().global().ssh_failures++;
}

void SshSession::FlushCounters(Channel& c) {
  if (!c.splice) return;
  auto [up, down] = c.bytes.Flush(&proxy_->stats(), target_.job_id, c.splice->to_socket_bytes(),
                                  c.splice->to_channel_bytes());
  bytes_up_ += up;
  bytes_down_ += down;
}

void SshSession::EndChannel(Channel& c) {
  FlushCounters(c);
  if (c.slot) {
    proxy_->ReturnChannelSlot();
    c.slot = false;
  }
  if (!c.splice) {
    LOG_DEBUG("ssh %llu job=%s channel %llu refused or dropped before it opened",
              static_cast<unsigned long long>(id()), target_.job_id.c_str(),
              static_cast<unsigned long long>(c.id));
    return;
  }
  last_activity_ms_ = std::max(last_activity_ms_, c.splice->last_activity_ms());
  if (c.counted) {
    proxy_->stats().SessionEnded(target_.job_id,
                                 static_cast<double>(uv_hrtime() - c.started_ns) / 1e9);
    c.counted = false;
  }
  const Status& s = c.splice->status();
  LOG_DEBUG("ssh %llu job=%s channel %llu closed: up=%llu down=%llu %s",
            static_cast<unsigned long long>(id()), target_.job_id.c_str(),
            static_cast<unsigned long long>(c.id),
            static_cast<unsigned long long>(c.splice->to_socket_bytes()),
            static_cast<unsigned long long>(c.splice->to_channel_bytes()),
            s.ok() ? "done" : s.message().c_str());
}

void SshSession::OnJobChanged(const std::string& id) {
  if (state_ != State::kAuthenticated || id != target_.job_id) return;
  if (proxy_->StillCurrent(target_)) return;
  // Not inside libssh (the registry changes on control requests and timers): close now.
  Close("job removed or replaced");
}

void SshSession::OnDeadline() {
  if (state_ != State::kHandshake) return;
  proxy_->stats().global().timeouts++;
  proxy_->stats().global().ssh_failures++;
  proxy_->RecordSourceFailure(*this, "handshake timeout");
  Close("handshake timeout");
}

void SshSession::OnSweep(uint64_t now_ms) {
  if (state_ != State::kAuthenticated) return;
  const ProxyOptions& o = proxy_->options();
  bool expired = false;
  for (auto& c : channels_) {
    FlushCounters(*c);
    // A backend that does not answer: the client's channel is refused within connect_timeout
    // (checked once per sweep).
    if (c->dialer && o.connect_timeout_ms > 0 &&
        now_ms - c->dial_started_ms >= static_cast<uint64_t>(o.connect_timeout_ms)) {
      proxy_->stats().global().unavailable++;
      LOG_INFO("ssh %llu job=%s channel %llu: backend connect timeout",
               static_cast<unsigned long long>(id()), target_.job_id.c_str(),
               static_cast<unsigned long long>(c->id));
      RefusePending(*c, "the job's service did not answer within connect_timeout");
      expired = true;
      continue;
    }
    if (!c->splice) continue;
    ChannelSplice& s = *c->splice;
    last_activity_ms_ = std::max(last_activity_ms_, s.last_activity_ms());
    // A channel is a session of its own: half-closed and quiet for half_close_timeout, it ends
    // (and gives back its backend connection) while the others go on.
    if (o.half_close_timeout_ms > 0 && s.attached() && s.half_closed() && !s.finished() &&
        now_ms - s.last_activity_ms() >= static_cast<uint64_t>(o.half_close_timeout_ms)) {
      proxy_->stats().global().idle_closed++;
      LOG_INFO("ssh %llu job=%s channel %llu: half-close timeout",
               static_cast<unsigned long long>(id()), target_.job_id.c_str(),
               static_cast<unsigned long long>(c->id));
      s.Fail(Status::Timeout("half-close timeout"));
      expired = true;
    }
  }
  if (o.idle_timeout_ms > 0 &&
      now_ms - last_activity_ms_ >= static_cast<uint64_t>(o.idle_timeout_ms)) {
    proxy_->stats().global().idle_closed++;
    Close("idle timeout");
    return;
  }
  if (expired) Service();  // reaps the expired channels
}

void SshSession::Close(const char* reason) {
  if (state_ == State::kClosed) return;
  bool authenticated = state_ == State::kAuthenticated;
  state_ = State::kClosed;
  proxy_->ClearDeadline(this);
  if (pause_timer_) pause_timer_.reset();
  if (more_timer_) more_timer_.reset();
  // Channels first (each unhooks its callbacks), then the session (which closes the socket).
  while (!channels_.empty()) {
    std::unique_ptr<Channel> c = std::move(channels_.back());
    channels_.pop_back();
    EndChannel(*c);
    c.reset();
  }
  if (transport_) {
    transport_->set_disconnect_on_close(true);
    transport_.reset();
  }
  uint64_t ms = proxy_->loop()->Now() - started_ms();
  LOG_INFO(
      "ssh %llu job=%s peer=%s channels=%llu up=%llu down=%llu duration=%llu.%03llus "
      "reason=%s",
      static_cast<unsigned long long>(id()), authenticated ? target_.job_id.c_str() : "-",
      PeerString().c_str(), static_cast<unsigned long long>(channels_opened_),
      static_cast<unsigned long long>(bytes_up_), static_cast<unsigned long long>(bytes_down_),
      static_cast<unsigned long long>(ms / 1000), static_cast<unsigned long long>(ms % 1000),
      reason);
  proxy_->Retire(this);
}

}  // namespace brokerproxy::proxy
