#include "proxy/transport/tls_relay.h"

#include <openssl/err.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>

namespace brokerproxy::proxy {
namespace {

// Steps per event before yielding to other connections (epoll is level-triggered, and a
// next-tick task resumes whatever is left).
constexpr int kRoundsPerEvent = 16;
// One TLS record's plaintext at most: what one SSL_read can return.
constexpr size_t kRecordPlaintext = 16 * 1024;

bool IsSocketFd(int fd) {
  struct stat st {};
  return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

bool WouldBlock(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

// One read buffer per thread serves every connection: reads are consumed before the next one.
char* Scratch() {
  static thread_local std::unique_ptr<char[]> buf(new char[TlsRelay::kReadChunk]);
  return buf.get();
}

}  // namespace

// ---- ByteQueue ----

char* ByteQueue::Reserve(size_t n) {
  if (cap_ - end_ >= n) return buf_.get() + end_;
  size_t used = size();
  if (used + n <= cap_) {
    std::memmove(buf_.get(), buf_.get() + begin_, used);
  } else {
    size_t cap = std::max(cap_ * 2, used + n);
    std::unique_ptr<char[]> bigger(new char[cap]);
    if (used > 0) std::memcpy(bigger.get(), buf_.get() + begin_, used);
    buf_ = std::move(bigger);
    cap_ = cap;
  }
  begin_ = 0;
  end_ = used;
  return buf_.get() + end_;
}

void ByteQueue::Append(std::string_view bytes) {
  if (bytes.empty()) return;
  std::memcpy(Reserve(bytes.size()), bytes.data(), bytes.size());
  Commit(bytes.size());
}

void ByteQueue::Consume(size_t n) {
  assert(n <= size());
  begin_ += n;
  if (begin_ == end_) {
    // Empty: give the memory back, so an idle connection costs nothing.
    buf_.reset();
    cap_ = begin_ = end_ = 0;
  }
}

// ---- TlsRelay ----

TlsRelay::TlsRelay(Role role, SslPtr ssl, loop::HandlePtr<loop::Poll> socket,
                   std::string initial_ciphertext, const char* tls_name, Callbacks callbacks)
    : role_(role),
      ssl_(std::move(ssl)),
      socket_(std::move(socket)),
      tls_name_(tls_name),
      cb_(std::move(callbacks)) {
  rbio_ = BIO_new(BIO_s_mem());
  wbio_ = BIO_new(BIO_s_mem());
  // SSL_set_bio takes both (a null one is reported by the first SSL call as an error).
  SSL_set_bio(ssl_.get(), rbio_, wbio_);
  if (role_ == Role::kServer) {
    SSL_set_accept_state(ssl_.get());
  } else {
    SSL_set_connect_state(ssl_.get());
  }
  if (rbio_ && !initial_ciphertext.empty()) {
    BIO_write(rbio_, initial_ciphertext.data(), static_cast<int>(initial_ciphertext.size()));
  }
}

TlsRelay::~TlsRelay() { *alive_ = false; }

void TlsRelay::Start() {
  assert(!started_);
  started_ = true;
  last_activity_ms_ = socket_->loop().Now();
  socket_->Start(0, [this](int status, int) {
    if (status < 0) {
      int err = SocketError(socket_->fd());
      Finish(NetError("connection", err ? err : ECONNRESET));
      return;
    }
    Pump();
  });
  Kick();
}

void TlsRelay::Kick() {
  if (finished_ || kick_.active()) return;
  kick_ = loop::Post(socket_->loop(), [this] { Pump(); });
}

bool TlsRelay::Call(const std::function<void()>& cb) {
  if (!cb) return !finished_;
  std::weak_ptr<bool> alive = alive_;
  cb();
  return !alive.expired() && !finished_;
}

void TlsRelay::Pump() {
  if (finished_) return;
  bool more = false;
  Status s = Work(&more);
  if (!s.ok()) {
    Finish(std::move(s));
    return;
  }
  if (handshake_done_ && !handshake_reported_) {
    handshake_reported_ = true;
    if (!Call(cb_.on_handshake)) return;
  }
  if (!attached_ && (inbox_grew_ || (peer_done() && !peer_done_reported_))) {
    inbox_grew_ = false;
    peer_done_reported_ = peer_done();
    if (!Call(cb_.on_data)) return;
  }
  if (down_done_ && up_done_) {
    Finish(Status::OK());
    return;
  }
  if (more) Kick();  // budget used up with work left
  UpdateInterest();
}

Status TlsRelay::Work(bool* more) {
  *more = false;
  for (int round = 0; round < kRoundsPerEvent; ++round) {
    bool progress = false;
    BP_RETURN_IF_ERROR(FlushNet(&progress));
    if (attached_) BP_RETURN_IF_ERROR(FlushPlain(&progress));
    BP_RETURN_IF_ERROR(ReadNet(&progress));
    BP_RETURN_IF_ERROR(Advance(&progress));
    if (attached_) {
      BP_RETURN_IF_ERROR(FlushPlain(&progress));
      BP_RETURN_IF_ERROR(ReadPlain(&progress));
    }
    BP_RETURN_IF_ERROR(FlushNet(&progress));
    if (!progress) return Status::OK();
  }
  *more = true;
  return Status::OK();
}

size_t TlsRelay::buffered() const {
  return net_out_.size() + app_.size() + plain_retry_.size() + BIO_ctrl_pending(rbio_) +
         BIO_ctrl_pending(wbio_);
}

size_t TlsRelay::NetPending() const { return net_out_.size() + BIO_ctrl_pending(wbio_); }

void TlsRelay::UpdateWatermarks() {
  size_t net = NetPending();
  if (!net_paused_ && net >= kHighWater) {
    net_paused_ = true;
    ++pauses_;
  } else if (net_paused_ && net <= kLowWater) {
    net_paused_ = false;
  }
  size_t app = app_.size();
  if (!app_paused_ && app >= kHighWater) {
    app_paused_ = true;
    ++pauses_;
  } else if (app_paused_ && app <= kLowWater) {
    app_paused_ = false;
  }
}

void TlsRelay::DrainWriteBio() {
  if (!wbio_) return;
  for (;;) {
    size_t pending = BIO_ctrl_pending(wbio_);
    if (pending == 0) break;
    char* dst = net_out_.Reserve(pending);
    int n = BIO_read(wbio_, dst, static_cast<int>(pending));
    if (n <= 0) break;
    net_out_.Commit(static_cast<size_t>(n));
  }
  UpdateWatermarks();
}

Status TlsRelay::NetError(const char* what, int err) const {
  return PosixError(std::string(what) + " (" + tls_name_ + ")", err);
}

Status TlsRelay::PlainError(const char* what, int err) const {
  return PosixError(std::string(what) + " " + plain_name_, err);
}

Status TlsRelay::FlushNet(bool* progress) {
  int fd = socket_->fd();
  while (!net_out_.empty()) {
    ssize_t n = ::send(fd, net_out_.data(), net_out_.size(), MSG_NOSIGNAL);
    if (n > 0) {
      net_out_.Consume(static_cast<size_t>(n));
      *progress = true;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && WouldBlock(errno)) break;
    return NetError("writing to the TLS connection", n < 0 ? errno : EPIPE);
  }
  UpdateWatermarks();
  if (net_out_.empty() && close_notify_sent_ && !net_shut_) {
    ::shutdown(fd, SHUT_WR);
    net_shut_ = true;
    up_done_ = true;
    *progress = true;
  }
  return Status::OK();
}

bool TlsRelay::CanReadNet() const {
  // Not gated by net_paused_: the peer's bytes must keep flowing while our own output waits
  // for it, or two relays facing each other (the proxy and `connect --tls`) each stop reading
  // because the other stopped reading (measured: a 2 GiB echo hung with both receive queues
  // full). Bulk output is held back in CanReadPlain; what reading can still add (protocol
  // answers such as KeyUpdate) is capped by kMaxNetPending.
  return !net_eof_ && !peer_closed_ && !app_paused_ && NetPending() < kMaxNetPending &&
         BIO_ctrl_pending(rbio_) < kMaxReadBio;
}

Status TlsRelay::ReadNet(bool* progress) {
  if (!rbio_ || !CanReadNet()) return Status::OK();
  char* buf = Scratch();
  for (;;) {
    ssize_t n = ::recv(socket_->fd(), buf, kReadChunk, 0);
    if (n > 0) {
      BIO_write(rbio_, buf, static_cast<int>(n));
      last_activity_ms_ = socket_->loop().Now();
      *progress = true;
      return Status::OK();
    }
    if (n == 0) {
      net_eof_ = true;
      BIO_set_mem_eof_return(rbio_, 0);  // OpenSSL now sees EOF instead of "retry"
      *progress = true;
      return Status::OK();
    }
    if (errno == EINTR) continue;
    if (WouldBlock(errno)) return Status::OK();
    return NetError("reading from the TLS connection", errno);
  }
}

Status TlsRelay::HandshakeError() {
  long verify = SSL_get_verify_result(ssl_.get());
  if (role_ == Role::kClient && verify != X509_V_OK) {
    ERR_clear_error();
    return Status::PermissionDenied(std::string("the certificate of the ") + tls_name_ +
                                    " does not verify: " + X509_verify_cert_error_string(verify));
  }
  if (net_eof_) {
    ERR_clear_error();
    return Status::Unavailable(std::string("the ") + tls_name_ +
                               " closed the connection during the TLS handshake");
  }
  return SslError(std::string("TLS handshake with the ") + tls_name_);
}

Status TlsRelay::Advance(bool* progress) {
  if (!handshake_done_) {
    ERR_clear_error();
    int rc = SSL_do_handshake(ssl_.get());
    int err = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_.get(), rc);
    DrainWriteBio();
    if (rc == 1) {
      handshake_done_ = true;
      *progress = true;
    } else if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      if (net_eof_) return HandshakeError();
      return Status::OK();
    } else {
      return HandshakeError();
    }
  }
  // Decrypt while the plaintext side keeps up (and below the hard cap on TLS output: SSL_read
  // may produce some, e.g. a KeyUpdate answer).
  while (!peer_closed_ && !app_paused_ && NetPending() < kMaxNetPending) {
    char* dst = app_.Reserve(kRecordPlaintext);
    ERR_clear_error();
    int n = SSL_read(ssl_.get(), dst, static_cast<int>(kRecordPlaintext));
    int err = n > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl_.get(), n);
    DrainWriteBio();
    if (n > 0) {
      app_.Commit(static_cast<size_t>(n));
      if (!attached_) inbox_grew_ = true;
      UpdateWatermarks();
      *progress = true;
      continue;
    }
    // Reserve() may have allocated for nothing: keep an empty queue free of memory.
    if (app_.empty()) app_.Consume(0);
    if (err == SSL_ERROR_ZERO_RETURN) {
      peer_closed_ = true;
      *progress = true;
      return Status::OK();
    }
    if (net_eof_) {
      ERR_clear_error();
      return Status::IOError(std::string("the ") + tls_name_ +
                             " closed the connection without TLS close_notify (truncated)");
    }
    if (err == SSL_ERROR_WANT_READ) return Status::OK();
    return SslError(std::string("TLS read from the ") + tls_name_);
  }
  return Status::OK();
}

Status TlsRelay::FlushPlain(bool* progress) {
  if (down_done_ || !plain_out_raw_) return Status::OK();
  int fd = plain_out_raw_->fd();
  while (!app_.empty()) {
    ssize_t n = plain_out_is_socket_ ? ::send(fd, app_.data(), app_.size(), MSG_NOSIGNAL)
                                     : ::write(fd, app_.data(), app_.size());
    if (n > 0) {
      app_.Consume(static_cast<size_t>(n));
      counters_.tls_to_plain += static_cast<uint64_t>(n);
      last_activity_ms_ = socket_->loop().Now();
      *progress = true;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && WouldBlock(errno)) break;
    return PlainError("writing to the", n < 0 ? errno : EPIPE);
  }
  UpdateWatermarks();
  if (app_.empty() && peer_closed_) {
    // The peer's close_notify, passed on once everything before it was delivered.
    if (plain_out_is_socket_) {
      ::shutdown(fd, SHUT_WR);
    } else if (plain_out_) {
      plain_out_.reset();  // a pipe (stdout) has no half-close: closing it is the EOF
      plain_out_raw_ = nullptr;
    }
    down_done_ = true;
    *progress = true;
  }
  return Status::OK();
}

bool TlsRelay::CanReadPlain() const {
  return attached_ && handshake_done_ && plain_in_ && !plain_eof_ && !net_paused_ &&
         !close_notify_sent_;
}

Status TlsRelay::WritePlainToTls(std::string_view data, bool* accepted) {
  *accepted = false;
  ERR_clear_error();
  int n = SSL_write(ssl_.get(), data.data(), static_cast<int>(data.size()));
  int err = n > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl_.get(), n);
  DrainWriteBio();
  if (n > 0) {
    // Without SSL_MODE_ENABLE_PARTIAL_WRITE a memory BIO takes everything.
    *accepted = true;
    return Status::OK();
  }
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return Status::OK();
  return SslError(std::string("TLS write to the ") + tls_name_);
}

Status TlsRelay::ReadPlain(bool* progress) {
  if (!CanReadPlain()) return Status::OK();
  if (!plain_retry_.empty()) {
    bool accepted = false;
    BP_RETURN_IF_ERROR(WritePlainToTls(plain_retry_, &accepted));
    if (!accepted) return Status::OK();
    counters_.plain_to_tls += plain_retry_.size();
    std::string().swap(plain_retry_);
    *progress = true;
    return Status::OK();
  }
  char* buf = Scratch();
  for (;;) {
    ssize_t n = ::read(plain_in_->fd(), buf, kReadChunk);
    if (n > 0) {
      bool accepted = false;
      BP_RETURN_IF_ERROR(WritePlainToTls(std::string_view(buf, static_cast<size_t>(n)), &accepted));
      if (accepted) {
        counters_.plain_to_tls += static_cast<uint64_t>(n);
      } else {
        plain_retry_.assign(buf, static_cast<size_t>(n));
      }
      last_activity_ms_ = socket_->loop().Now();
      *progress = true;
      return Status::OK();
    }
    if (n == 0) {
      plain_eof_ = true;
      // The end of the plaintext side becomes close_notify (then SHUT_WR in FlushNet).
      ERR_clear_error();
      SSL_shutdown(ssl_.get());
      ERR_clear_error();
      DrainWriteBio();
      close_notify_sent_ = true;
      *progress = true;
      return Status::OK();
    }
    if (errno == EINTR) continue;
    if (WouldBlock(errno)) return Status::OK();
    return PlainError("reading from the", errno);
  }
}

void TlsRelay::UpdateInterest() {
  if (finished_) return;
  int events = CanReadNet() ? UV_READABLE : 0;
  if (!net_out_.empty()) events |= UV_WRITABLE;
  socket_->SetEvents(events);
  if (!attached_) return;
  int in = CanReadPlain() ? UV_READABLE : 0;
  int out = (!down_done_ && !app_.empty()) ? UV_WRITABLE : 0;
  if (plain_in_ && plain_out_raw_ == plain_in_.get()) {
    plain_in_->SetEvents(in | out);
    return;
  }
  if (plain_in_) plain_in_->SetEvents(in);
  if (plain_out_raw_) plain_out_raw_->SetEvents(out);
}

void TlsRelay::Consume(size_t n) {
  app_.Consume(std::min(n, app_.size()));
  UpdateWatermarks();
  Kick();
}

Status TlsRelay::Send(std::string_view plaintext) {
  assert(handshake_done_);
  if (finished_) return Status::Unavailable("the TLS connection is closed");
  if (!plain_retry_.empty()) {
    plain_retry_.append(plaintext);
  } else {
    bool accepted = false;
    BP_RETURN_IF_ERROR(WritePlainToTls(plaintext, &accepted));
    if (!accepted) plain_retry_.assign(plaintext);
  }
  Kick();
  return Status::OK();
}

void TlsRelay::Attach(PollSide plain, const char* plain_name) {
  assert(!attached_);
  plain_name_ = plain_name;
  plain_in_ = std::move(plain.in);
  plain_out_ = std::move(plain.out);
  plain_out_raw_ = plain_out_ ? plain_out_.get() : plain_in_.get();
  plain_out_is_socket_ = IsSocketFd(plain_out_raw_->fd());
  attached_ = true;
  auto on_event = [this](loop::Poll* poll) {
    return [this, poll](int status, int) {
      if (status < 0) {
        int err = SocketError(poll->fd());
        Finish(PlainError("error on the", err ? err : ECONNRESET));
        return;
      }
      Pump();
    };
  };
  plain_in_->Start(0, on_event(plain_in_.get()));
  if (plain_out_) plain_out_->Start(0, on_event(plain_out_.get()));
  Kick();
}

void TlsRelay::Abort(std::string_view last) {
  if (finished_) return;
  finished_ = true;
  kick_.Detach();
  if (handshake_done_ && !close_notify_sent_) {
    if (!last.empty()) {
      bool accepted = false;
      (void)WritePlainToTls(last, &accepted);
    }
    ERR_clear_error();
    SSL_shutdown(ssl_.get());
    ERR_clear_error();
    DrainWriteBio();
  }
  plain_in_.reset();
  plain_out_.reset();
  plain_out_raw_ = nullptr;
  if (!socket_) return;
  int fd = socket_->ReleaseFd();
  socket_.reset();
  if (!net_shut_) SendBestEffort(fd, std::string_view(net_out_.data(), net_out_.size()));
  CloseGracefully(fd);
}

void TlsRelay::Finish(Status status) {
  if (finished_) return;
  finished_ = true;
  kick_.Detach();
  // A failed handshake leaves an alert in the write BIO: let the peer see it if it fits now.
  DrainWriteBio();
  if (socket_ && !net_shut_ && !net_out_.empty()) {
    SendBestEffort(socket_->fd(), std::string_view(net_out_.data(), net_out_.size()));
  }
  if (socket_) socket_->Stop();
  if (plain_in_) plain_in_->Stop();
  if (plain_out_) plain_out_->Stop();
  auto done = std::move(cb_.on_done);
  if (done) done(std::move(status));  // may destroy this
}

}  // namespace brokerproxy::proxy
