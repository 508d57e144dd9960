#include "proxy/server/session.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "loop/log.h"

namespace brokerproxy::proxy {

Session::Session(Proxy* proxy, loop::IoHandle client, const sockaddr_storage& peer)
    : Connection(proxy, peer),
      client_(std::move(client)),
      admission_(this, this, SessionKind::kPlain, &target_) {}

Session::~Session() = default;

void Session::Start() {
  const ProxyOptions& o = proxy_->options();
  // Plain and TLS clients speak first, at once; an SSH client may wait for the server's banner
  // instead (RFC 4253 lets either side start). After a short silence, assume SSH.
  banner_pending_ = o.ssh_banner_delay_ms > 0 && proxy_->has_frontend(Protocol::kSsh) &&
                    (o.handshake_timeout_ms == 0 || o.ssh_banner_delay_ms < o.handshake_timeout_ms);
  proxy_->ArmDeadline(this, banner_pending_ ? o.ssh_banner_delay_ms : o.handshake_timeout_ms);
  client_->SetCallback([this](loop::IoWatch*) { OnClientReadable(/*speculative=*/false); });
  // A client usually sends its first bytes right behind the handshake, so they are likely
  // there already: look now rather than a loop turn later. Nothing here if not (one recv).
  OnClientReadable(/*speculative=*/true);
}

void Session::OnClientReadable(bool speculative) {
  if ((!speculative && !client_->readable()) || state_ == State::kConnecting) return;
  int fd = client_->fd();
  char buf[kMaxPreambleBytes];
  size_t room = kMaxPreambleBytes - preamble_.size();
  // Peek first: TLS and SSH bytes stay in the socket for their frontends (sniffer.h).
  ssize_t n = ::recv(fd, buf, room, MSG_PEEK);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) client_->ClearReadable();
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    Finish("client error during handshake");
    return;
  }
  if (n == 0) {
    Finish("client closed during handshake");
    return;
  }
  if (state_ == State::kSniffing) {
    Protocol p = Sniff(std::string_view(buf, n));
    if (p == Protocol::kNeedMore && client_->hangup()) p = Protocol::kUnknown;
    if (p == Protocol::kNeedMore) {
      // A few bytes of what may be an HTTP method: wait for the rest (still unread, so the
      // next segment brings a new edge).
      if (static_cast<size_t>(n) < room) client_->ClearReadable();
      return;
    }
    if (banner_pending_) {
      // It spoke before the banner delay: the handshake's own deadline from now on.
      banner_pending_ = false;
      int64_t left = proxy_->options().handshake_timeout_ms;
      if (left > 0) {
        uint64_t at = started_ms() + static_cast<uint64_t>(left);
        proxy_->SetDeadline(this, std::max(at, proxy_->loop()->Now()));
      } else {
        proxy_->ClearDeadline(this);
      }
    }
    if (p == Protocol::kTls || p == Protocol::kSsh) {
      HandOff(p);
      return;
    }
    if (p == Protocol::kHttp) {
      proxy_->RecordSourceFailure(*this, "http request");
      RejectHttp();
      return;
    }
    if (p != Protocol::kPlain) {
      proxy_->RecordSourceFailure(*this, "unknown protocol");
      Reject(ErrorCode::kBadRequest, "unknown protocol");
      return;
    }
    state_ = State::kPreamble;
  }
  const char* nl = static_cast<const char*>(std::memchr(buf, '\n', n));
  // All that was peeked is taken: the rest of the line, and the bytes a client pipelined behind
  // it, which go to the backend first once it is up. One read instead of two, and those bytes
  // are on their way within the loop turn that connects the backend.
  size_t old = preamble_.size();
  preamble_.resize(old + n);
  ssize_t got = ::recv(fd, preamble_.data() + old, n, 0);
  if (got != n) {  // the peeked bytes are there: this cannot fail
    Finish("client error during handshake");
    return;
  }
  // Everything that had arrived is consumed: anything newer brings its own edge, so no read is
  // needed to learn that the socket is empty (and the relay need not look at it first).
  if (static_cast<size_t>(n) < room && !client_->hangup()) client_->ClearReadable();
  // Still readable while the line is incomplete means the client's FIN is waiting: no new edge
  // will report it, so come back for it on a later turn (and close then).
  auto wait_for_more = [this] {
    if (client_->readable()) client_->Yield();
  };
  // Parse the whole line once it is complete; before that only the short head, so that
  // garbage fails at once while a line arriving byte by byte costs O(n), not O(n^2).
  if (!nl && preamble_.size() > 2 * kPreambleMagic.size() && preamble_.size() < kMaxPreambleBytes) {
    wait_for_more();
    return;
  }
  Preamble p = ParsePreamble(preamble_);
  switch (p.state) {
    case Preamble::State::kNeedMore:
      wait_for_more();
      return;
    case Preamble::State::kBad:
      LOG_DEBUG("session %llu: bad preamble: %s", static_cast<unsigned long long>(id()), p.error);
      proxy_->RecordSourceFailure(*this, "bad preamble");
      Reject(ErrorCode::kBadRequest, "bad preamble");
      return;
    case Preamble::State::kDone:
      // What follows the line is the backend's (at most kMaxPreambleBytes in all; anything
      // later waits in the socket: kConnecting ignores the client's events, and the readable
      // flag keeps what is pending for the relay).
      preamble_.erase(0, p.length);
      early_bytes_ = static_cast<uint16_t>(preamble_.size());
      if (preamble_.empty()) std::string().swap(preamble_);
      state_ = State::kConnecting;
      admission_.Start(p, Admission::Channel::kPlain,
                       /*may_complete_inline=*/true);  // the last thing this function does
      return;
  }
}

void Session::HandOff(Protocol p) {
  proxy_->ClearDeadline(this);
  state_ = State::kClosed;
  if (!proxy_->HandOff(p, std::move(client_), *this)) {
    // No frontend for it in this build: answer like any unknown protocol.
    proxy_->stats().global().bad_request++;
    LOG_INFO("session %llu peer=%s proto=%s reason=protocol not enabled",
             static_cast<unsigned long long>(id()), PeerString().c_str(), ProtocolName(p));
  }
  proxy_->Retire(this);
}

void Session::OnBannerDelay() {
  banner_pending_ = false;
  // Bytes that came in just now, with their edge not handled yet, decide as usual (so do a FIN
  // and an error).
  char c;
  ssize_t n = ::recv(client_->fd(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
  if (!(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))) {
    int64_t left = proxy_->options().handshake_timeout_ms;
    if (left > 0) proxy_->SetDeadline(this, started_ms() + static_cast<uint64_t>(left));
    OnClientReadable(/*speculative=*/true);  // reads the bytes, the FIN or the error
    return;
  }
  // Silent: an SSH client waiting for the server to speak first (ssh-keyscan does). The SSH
  // frontend sends the banner and runs the handshake under its own deadline; from now on the
  // connection is SSH, so a preamble or ClientHello coming late fails its key exchange.
  HandOff(Protocol::kSsh);
}

void Session::RejectHttp() {
  proxy_->stats().global().bad_request++;
  sockaddr_storage local{};
  socklen_t len = sizeof(local);
  int port = 0;
  if (::getsockname(client_->fd(), reinterpret_cast<sockaddr*>(&local), &len) == 0) {
    port = local.ss_family == AF_INET6
               ? ntohs(reinterpret_cast<const sockaddr_in6*>(&local)->sin6_port)
               : ntohs(reinterpret_cast<const sockaddr_in*>(&local)->sin_port);
  }
  int fd = client_.Release();
  // The request stays unread: CloseGracefully() drains it, so that closing does not reset the
  // connection before the client has read the answer.
  SendBestEffort(fd, HttpBadRequest(proxy_->options().tls_domain, port));
  CloseGracefully(fd);
  Finish("bad-request: http request");
}

void Session::Connected(loop::IoHandle backend) {
  state_ = State::kSplicing;
  admission_.Admitted();
  // "OK\n" is written now, on a fresh socket with an empty buffer; only if it does not fit does
  // the relay carry the rest, before the backend's first bytes. The client's early bytes go
  // to the backend now too, if it is writable already (a loopback backend is, at once).
  //
  // A client that pipelined bytes is not waiting for the OK to send: it waits for the answer.
  // Its OK is then held back (MSG_MORE) to leave in one segment with the backend's first bytes,
  // which saves a segment, its ACK and a wake-up of the client per connection. Anything sent
  // to the client, its FIN included, takes the OK along. If the backend says nothing within
  // held_ok_ms, the OK leaves alone (ReleaseHeldOk): a client that stops at a budget of early
  // bytes until it sees the OK (connect does, at 64 KiB) waits no longer than that. The kernel
  // alone would hold it for a retransmission timeout (200 ms or more).
  int64_t hold_ms = proxy_->options().held_ok_ms;
  bool hold = early_bytes_ > 0 && hold_ms > 0;
  size_t sent = SendBestEffort(client_.fd(), kReplyOk, hold ? MSG_MORE : 0);
  if (hold && sent == kReplyOk.size()) {
    held_ok_fd_ = client_.fd();
    proxy_->ArmDeadline(this, hold_ms);
  }
  relay_.emplace(proxy_->pipes(), Relay::Side{std::move(client_)}, Relay::Side{std::move(backend)},
                 "client", "backend", std::string(kReplyOk.substr(sent)), std::move(preamble_),
                 [this](Status s) {
                   if (s.ok()) {
                     Finish("done");
                     return;
                   }
                   std::string reason = s.message();
                   Finish(reason.c_str());
                 });
  relay_->Start(/*now=*/true);  // the last thing done here: it may finish the session
}

void Session::Reject(ErrorCode code, const char* reason) {
  GlobalCounters& g = proxy_->stats().global();
  if (code == ErrorCode::kBadRequest) g.bad_request++;
  if (code == ErrorCode::kTimeout) g.timeouts++;
  if (client_) {
    int fd = client_.Release();
    SendBestEffort(fd, ErrorReply(code));
    CloseGracefully(fd);
  }
  std::string why = std::string(ErrorCodeName(code)) + ": " + reason;
  Finish(why.c_str());
}

void Session::ReleaseHeldOk() {
  if (held_ok_fd_ < 0) return;
  // Setting TCP_NODELAY (already set) pushes what is queued; after the backend's first bytes
  // took the OK along, there is nothing left to push.
  int one = 1;
  (void)::setsockopt(held_ok_fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  held_ok_fd_ = -1;
}

void Session::OnDeadline() {
  if (state_ == State::kSplicing) {
    ReleaseHeldOk();
    return;
  }
  if (banner_pending_ && state_ == State::kSniffing) {
    OnBannerDelay();
    return;
  }
  if (state_ == State::kConnecting) {
    admission_.OnDialDeadline();
    return;
  }
  proxy_->RecordSourceFailure(*this, "handshake timeout");
  Reject(ErrorCode::kTimeout, "handshake timeout");
}

void Session::FlushCounters() {
  if (!relay_) return;
  Relay::Counters c = relay_->counters();
  bytes_.Flush(&proxy_->stats(), target_.job_id, c.a_to_b + early_bytes_, c.b_to_a);
}

void Session::OnSweep(uint64_t now_ms) {
  if (state_ != State::kSplicing) return;
  FlushCounters();
  uint64_t idle = now_ms - relay_->last_activity_ms();
  const ProxyOptions& o = proxy_->options();
  if (o.idle_timeout_ms > 0 && idle >= static_cast<uint64_t>(o.idle_timeout_ms)) {
    proxy_->stats().global().idle_closed++;
    Close("idle timeout");
    return;
  }
  if (relay_->half_closed() && o.half_close_timeout_ms > 0 &&
      idle >= static_cast<uint64_t>(o.half_close_timeout_ms)) {
    proxy_->stats().global().idle_closed++;
    Close("half-close timeout");
  }
}

void Session::Close(const char* reason) { Finish(reason); }

void Session::Finish(const char* reason) {
  if (finished_) return;
  finished_ = true;
  state_ = State::kClosed;
  proxy_->ClearDeadline(this);
  uint64_t up = 0, down = 0;
  if (relay_) {
    FlushCounters();
    up = relay_->counters().a_to_b + early_bytes_;
    down = relay_->counters().b_to_a;
  }
  admission_.Stop();  // the job's active count, if spliced
  // Release the sockets now (fds are precious); the object itself goes on a later turn.
  held_ok_fd_ = -1;  // a FIN, if the relay sent none, takes a held OK along when it closes
  relay_.reset();
  client_.reset();
  uint64_t ms = proxy_->loop()->Now() - started_ms();
  LOG_INFO("session %llu job=%s peer=%s up=%llu down=%llu duration=%llu.%03llus reason=%s",
           static_cast<unsigned long long>(id()),
           target_.job_id.empty() ? "-" : target_.job_id.c_str(), PeerString().c_str(),
           static_cast<unsigned long long>(up), static_cast<unsigned long long>(down),
           static_cast<unsigned long long>(ms / 1000), static_cast<unsigned long long>(ms % 1000),
           reason);
  proxy_->Retire(this);
}

}  // namespace brokerproxy::proxy
