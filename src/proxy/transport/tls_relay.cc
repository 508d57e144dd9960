#include "proxy/transport/tls_relay.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <cstring>

namespace brokerproxy::proxy {
namespace {

// What one SSL call may be given (its lengths are ints).
int Clamp(size_t n) { return static_cast<int>(std::min<size_t>(n, 1 << 30)); }

// One read of the inbox before Attach.
constexpr size_t kInboxRead = 64 * 1024;

}  // namespace

// ---- ByteQueue ----

namespace {

// This thread's spare blocks (see ByteQueue), freed when the thread ends.
class SpareBlockList {
 public:
  SpareBlockList() = default;
  SpareBlockList(const SpareBlockList&) = delete;
  SpareBlockList& operator=(const SpareBlockList&) = delete;
  ~SpareBlockList() {
    for (size_t i = 0; i < count_; ++i) delete[] blocks_[i];
  }
  char* Take() { return count_ > 0 ? blocks_[--count_] : new char[ByteQueue::kBlockSize]; }
  void Give(char* block) {
    if (count_ == blocks_.size()) {
      delete[] block;
    } else {
      blocks_[count_++] = block;
    }
  }
  size_t count() const { return count_; }

 private:
  std::array<char*, ByteQueue::kMaxSpareBlocks> blocks_{};
  size_t count_ = 0;
};

thread_local SpareBlockList spare_blocks;

}  // namespace

size_t ByteQueue::SpareBlocks() { return spare_blocks.count(); }

void ByteQueue::Release() {
  if (buf_ != nullptr) {
    if (cap_ == kBlockSize) {
      spare_blocks.Give(buf_);
    } else {
      delete[] buf_;
    }
  }
  buf_ = nullptr;
  cap_ = begin_ = end_ = 0;
}

char* ByteQueue::Reserve(size_t n) {
  if (cap_ - end_ >= n) return buf_ + end_;
  size_t used = size();
  if (used + n <= cap_) {
    std::memmove(buf_, buf_ + begin_, used);
  } else {
    size_t cap = std::max({cap_ * 2, used + n, kBlockSize});
    char* bigger = cap == kBlockSize ? spare_blocks.Take() : new char[cap];
    if (used > 0) std::memcpy(bigger, buf_ + begin_, used);
    Release();
    buf_ = bigger;
    cap_ = cap;
  }
  begin_ = 0;
  end_ = used;
  return buf_ + end_;
}

void ByteQueue::Append(std::string_view bytes) {
  if (bytes.empty()) return;
  std::memcpy(Reserve(bytes.size()), bytes.data(), bytes.size());
  Commit(bytes.size());
}

void ByteQueue::Consume(size_t n) {
  assert(n <= size());
  begin_ += n;
  // Empty: give the memory back, so an idle connection costs nothing.
  if (begin_ == end_) Release();
}

// ---- TlsTransport ----

BIO_METHOD* TlsTransport::Method() {
  // Created once and never freed: it is shared by every connection of the process.
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "brokerproxy socket");
    if (m) {
      BIO_meth_set_read(m, &TlsTransport::BioRead);
      BIO_meth_set_write(m, &TlsTransport::BioWrite);
      BIO_meth_set_ctrl(m, &TlsTransport::BioCtrl);
    }
    return m;
  }();
  return method;
}

TlsTransport::TlsTransport(Role role, SslPtr ssl, loop::IoHandle socket,
                           std::string initial_ciphertext, const char* peer_name)
    : role_(role), ssl_(std::move(ssl)), sock_(std::move(socket), true), peer_name_(peer_name) {
  rbuf_.Append(initial_ciphertext);
  BIO* bio = Method() ? BIO_new(Method()) : nullptr;
  if (bio) {
    BIO_set_data(bio, this);
    BIO_set_init(bio, 1);
  }
  // SSL_set_bio takes the one reference for both directions (a null BIO is reported by the
  // first SSL call as an error).
  SSL_set_bio(ssl_.get(), bio, bio);
  // A write that would block keeps its record in OpenSSL and is retried from the pump's
  // buffer, which may have moved; each record written is reported at once.
  SSL_set_mode(ssl_.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                               SSL_MODE_RELEASE_BUFFERS);
  if (role_ == Role::kServer) {
    SSL_set_accept_state(ssl_.get());
  } else {
    SSL_set_connect_state(ssl_.get());
  }
}

TlsTransport::~TlsTransport() {
  ssl_.reset();  // before the socket: the BIO points here
}

int TlsTransport::BioRead(BIO* bio, char* buf, int len) {
  auto* t = static_cast<TlsTransport*>(BIO_get_data(bio));
  BIO_clear_retry_flags(bio);
  if (len <= 0) return 0;
  if (t->rbuf_.empty()) {
    // The flag, not a syscall, says the socket is empty: an edge sets it again.
    if (!t->sock_.open() || !t->sock_.readable()) {
      BIO_set_retry_read(bio);
      return -1;
    }
    // Read ahead: one recv for all the records that are queued, up to kBufferSize.
    ssize_t n = t->sock_.Read(t->rbuf_.Reserve(kBufferSize), kBufferSize);
    if (n <= 0) {
      t->rbuf_.Consume(0);  // frees the reservation
      if (n == 0) {
        t->net_eof_ = true;
        return 0;
      }
      if (n == -EAGAIN) {
        BIO_set_retry_read(bio);
        return -1;
      }
      t->net_errno_ = static_cast<int>(-n);
      errno = t->net_errno_;
      return -1;
    }
    t->rbuf_.Commit(static_cast<size_t>(n));
  }
  size_t n = std::min(t->rbuf_.size(), static_cast<size_t>(len));
  std::memcpy(buf, t->rbuf_.data(), n);
  t->rbuf_.Consume(n);
  return static_cast<int>(n);
}

int TlsTransport::BioWrite(BIO* bio, const char* data, int len) {
  auto* t = static_cast<TlsTransport*>(BIO_get_data(bio));
  BIO_clear_retry_flags(bio);
  if (len <= 0) return 0;
  // Records are collected and sent together (FlushOut); a full buffer is sent first.
  if (t->wbuf_.size() >= kBufferSize) {
    Status s = t->FlushOut();
    if (!s.ok()) {
      errno = t->net_errno_;
      return -1;
    }
    if (t->wbuf_.size() >= kBufferSize) {
      BIO_set_retry_write(bio);
      return -1;
    }
  }
  t->wbuf_.Append(std::string_view(data, static_cast<size_t>(len)));
  return len;
}

long TlsTransport::BioCtrl(BIO* bio, int cmd, long, void*) {
  auto* t = static_cast<TlsTransport*>(BIO_get_data(bio));
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      // What the socket does not take now goes on the next writable edge.
      if (t->FlushOut().ok()) return 1;
      return 0;
    case BIO_CTRL_EOF:
      return t->net_eof_ && t->rbuf_.empty() ? 1 : 0;
    case BIO_CTRL_PENDING:
      return static_cast<long>(t->rbuf_.size());
    case BIO_CTRL_WPENDING:
      return static_cast<long>(t->wbuf_.size());
    default:
      return 0;
  }
}

Status TlsTransport::FlushOut() {
  while (!wbuf_.empty()) {
    if (!sock_.open()) return NetError("writing to the TLS connection", EPIPE);
    if (!sock_.writable()) return Status::OK();  // a writable edge brings us back
    ssize_t n = sock_.Write(wbuf_.data(), wbuf_.size(), hold_ ? MSG_MORE : 0);
    if (n > 0) {
      wbuf_.Consume(static_cast<size_t>(n));
      continue;
    }
    if (n == -EAGAIN || n == 0) return Status::OK();
    net_errno_ = static_cast<int>(-n);
    return NetError("writing to the TLS connection", net_errno_);
  }
  return Status::OK();
}

void TlsTransport::PushHeld() {
  int one = 1;
  if (sock_.open()) (void)::setsockopt(sock_.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

Status TlsTransport::NetError(const char* what, int err) const {
  return PosixError(std::string(what) + " (" + peer_name_ + ")", err);
}

Status TlsTransport::Failure(const char* what, bool reading) {
  if (net_eof_) {
    ERR_clear_error();
    return Status::IOError(std::string("the ") + peer_name_ +
                           " closed the connection without TLS close_notify (truncated)");
  }
  if (net_errno_ != 0) {
    ERR_clear_error();
    return NetError(reading ? "reading from the TLS connection" : "writing to the TLS connection",
                    net_errno_);
  }
  return SslError(std::string(what) + peer_name_);
}

Status TlsTransport::HandshakeError() {
  long verify = SSL_get_verify_result(ssl_.get());
  if (role_ == Role::kClient && verify != X509_V_OK) {
    ERR_clear_error();
    return Status::PermissionDenied(std::string("the certificate of the ") + peer_name_ +
                                    " does not verify: " + X509_verify_cert_error_string(verify));
  }
  if (net_eof_) {
    ERR_clear_error();
    return Status::Unavailable(std::string("the ") + peer_name_ +
                               " closed the connection during the TLS handshake");
  }
  if (net_errno_ != 0) {
    ERR_clear_error();
    return NetError("TLS handshake", net_errno_);
  }
  return SslError(std::string("TLS handshake with the ") + peer_name_);
}

IoResult TlsTransport::Handshake() {
  if (handshake_done_) return IoResult::Bytes(0);
  ERR_clear_error();
  int rc = SSL_do_handshake(ssl_.get());
  int err = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_.get(), rc);
  // Best effort also on failure: the peer may learn why from the alert.
  Status flushed = FlushOut();
  if (rc == 1) {
    handshake_done_ = true;
    if (!flushed.ok()) return IoResult::Error(std::move(flushed));
    return IoResult::Bytes(0);
  }
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
    if (net_eof_ || net_errno_ != 0) return IoResult::Error(HandshakeError());
    if (!flushed.ok()) return IoResult::Error(std::move(flushed));
    return IoResult::Again();
  }
  return IoResult::Error(HandshakeError());
}

IoResult TlsTransport::Read(char* buf, size_t cap) {
  if (!error_.ok()) return IoResult::Error(error_);
  size_t got = 0;
  bool eof = false;
  for (;;) {
    read_wants_write_ = false;
    while (got < cap) {
      ERR_clear_error();
      int n = SSL_read(ssl_.get(), buf + got, Clamp(cap - got));
      if (n > 0) {
        got += static_cast<size_t>(n);
        continue;
      }
      int err = SSL_get_error(ssl_.get(), n);
      if (err == SSL_ERROR_ZERO_RETURN) {
        eof = true;  // close_notify: reported again by the next call if bytes came first
        break;
      }
      if (err == SSL_ERROR_WANT_READ) break;
      if (err == SSL_ERROR_WANT_WRITE) {  // a protocol answer waits for the socket
        read_wants_write_ = true;
        break;
      }
      error_ = Failure("TLS read from the ", true);
      if (got == 0) return IoResult::Error(error_);
      break;  // the bytes before the failure first
    }
    if (!wbuf_.empty()) {
      Status s = FlushOut();
      if (!s.ok() && error_.ok()) error_ = s;
    }
    // Blocked on a write that the flush made room for: go on (no edge would come).
    if (got < cap && read_wants_write_ && error_.ok() && wbuf_.empty() && sock_.writable()) {
      continue;
    }
    break;
  }
  if (got > 0) return IoResult::Bytes(got);
  if (!error_.ok()) return IoResult::Error(error_);
  return eof ? IoResult::Eof() : IoResult::Again();
}

IoResult TlsTransport::Write(const char* data, size_t len) {
  if (!error_.ok()) return IoResult::Error(error_);
  size_t put = 0;
  for (;;) {
    write_wants_read_ = false;
    bool blocked = false;
    while (put < len) {
      ERR_clear_error();
      int n = SSL_write(ssl_.get(), data + put, Clamp(len - put));
      if (n > 0) {
        put += static_cast<size_t>(n);
        continue;
      }
      int err = SSL_get_error(ssl_.get(), n);
      if (err == SSL_ERROR_WANT_WRITE) {
        blocked = true;
        break;
      }
      if (err == SSL_ERROR_WANT_READ) {
        write_wants_read_ = true;
        break;
      }
      error_ = Failure("TLS write to the ", false);
      return IoResult::Error(error_);
    }
    Status s = FlushOut();
    if (!s.ok()) {
      error_ = s;
      return IoResult::Error(error_);
    }
    // The records did not fit, and the flush made room while the socket stays writable: go
    // on (no edge would come).
    if (blocked && wbuf_.empty() && sock_.writable()) continue;
    break;
  }
  return put > 0 ? IoResult::Bytes(put) : IoResult::Again();
}

bool TlsTransport::readable() const {
  if (!error_.ok()) return true;  // the next call reports it
  if (read_wants_write_) return sock_.writable();
  return !rbuf_.empty() || SSL_pending(ssl_.get()) > 0 || sock_.readable();
}

bool TlsTransport::writable() const {
  if (!error_.ok()) return true;
  if (write_wants_read_) return !rbuf_.empty() || sock_.readable();
  return sock_.writable();
}

IoResult TlsTransport::ShutdownWrite(bool last) {
  if (!error_.ok()) return IoResult::Error(error_);
  if (!close_notify_sent_) {
    ERR_clear_error();
    int rc = SSL_shutdown(ssl_.get());
    if (rc < 0) {
      int err = SSL_get_error(ssl_.get(), rc);
      if (err != SSL_ERROR_WANT_WRITE && err != SSL_ERROR_WANT_READ) {
        error_ = Failure("TLS close_notify to the ", false);
        return IoResult::Error(error_);
      }
      // The alert did not fit behind the records waiting for the socket: OpenSSL sends it
      // again on the next call.
      Status s = FlushOut();
      if (!s.ok()) {
        error_ = s;
        return IoResult::Error(error_);
      }
      return IoResult::Again();
    }
    close_notify_sent_ = true;
  }
  Status s = FlushOut();
  if (!s.ok()) {
    error_ = s;
    return IoResult::Error(error_);
  }
  if (!wbuf_.empty()) return IoResult::Again();  // a writable edge brings the pump back
  // The close_notify is out; the FIN follows it (now, or when the relay closes the socket).
  if (!last) ::shutdown(sock_.fd(), SHUT_WR);
  return IoResult::Eof();
}

void TlsTransport::SetCallback(const loop::IoWatch::Callback& cb) {
  if (!sock_.open()) return;
  if (!cb) {
    sock_.watch()->SetCallback(nullptr);
    return;
  }
  // Records collected while the socket was full go out on its next writable edge, whether or
  // not the pump has more to write.
  sock_.watch()->SetCallback([this, cb](loop::IoWatch* w) {
    if (!wbuf_.empty() && error_.ok()) {
      Status s = FlushOut();
      if (!s.ok()) error_ = s;
    }
    cb(w);
  });
}

void TlsTransport::Yield() {
  if (sock_.open()) sock_.watch()->Yield();
}

void TlsTransport::Abort(std::string_view last) {
  if (handshake_done_ && !close_notify_sent_ && error_.ok()) {
    if (!last.empty()) {
      ERR_clear_error();
      (void)SSL_write(ssl_.get(), last.data(), Clamp(last.size()));
    }
    ERR_clear_error();
    SSL_shutdown(ssl_.get());
    ERR_clear_error();
    close_notify_sent_ = true;
  }
  if (!sock_.open()) return;
  int fd = sock_.handle().Release();
  SendBestEffort(fd, std::string_view(wbuf_.data(), wbuf_.size()));
  wbuf_.Consume(wbuf_.size());
  CloseGracefully(fd);
}

// ---- TlsRelay ----

TlsRelay::TlsRelay(Role role, SslPtr ssl, loop::IoHandle socket, std::string initial_ciphertext,
                   const char* tls_name, Callbacks callbacks)
    : tls_(std::make_unique<TlsTransport>(role, std::move(ssl), std::move(socket),
                                          std::move(initial_ciphertext), tls_name)),
      tls_raw_(tls_.get()),
      tls_name_(tls_name),
      cb_(std::move(callbacks)) {}

TlsRelay::~TlsRelay() { lifetime_.End(); }

void TlsRelay::Start() {
  assert(!started_);
  started_ = true;
  last_activity_ms_ = tls_->loop().Now();
  tls_->SetCallback([this](loop::IoWatch*) { OnEvent(); });
  // The ClientHello may be here already, and the socket's readiness is known from its edges.
  tls_->Yield();
}

bool TlsRelay::Call(const std::function<void()>& cb) {
  if (!cb) return !finished_;
  loop::Lifetime::Weak alive = lifetime_.weak();
  cb();
  return alive.alive() && !finished_;
}

void TlsRelay::OnEvent() {
  if (finished_ || relay_) return;
  bool progress = false;
  Status s = Work(&progress);
  if (!s.ok()) {
    Finish(std::move(s));
    return;
  }
  if (progress) last_activity_ms_ = tls_->loop().Now();
  if (handshake_done_ && !handshake_reported_) {
    handshake_reported_ = true;
    if (!Call(cb_.on_handshake)) return;
    if (relay_) return;
  }
  if (inbox_grew_ || (peer_closed_ && !peer_done_reported_)) {
    inbox_grew_ = false;
    peer_done_reported_ = peer_closed_;
    if (!Call(cb_.on_data)) return;
  }
}

Status TlsRelay::Work(bool* progress) {
  if (!handshake_done_) {
    IoResult r = tls_->Handshake();
    if (r.kind == IoResult::Kind::kError) return r.error;
    if (r.kind == IoResult::Kind::kAgain) return Status::OK();
    handshake_done_ = true;
    *progress = true;
  }
  while (!out_.empty()) {
    IoResult r = tls_->Write(out_.data(), out_.size());
    if (r.kind == IoResult::Kind::kError) return r.error;
    if (r.kind != IoResult::Kind::kBytes) break;
    out_.Consume(r.n);
    *progress = true;
  }
  while (!peer_closed_ && inbox_.size() < kMaxInbox && tls_->readable()) {
    IoResult r = tls_->Read(inbox_.Reserve(kInboxRead), kInboxRead);
    if (r.kind == IoResult::Kind::kBytes) {
      inbox_.Commit(r.n);
      inbox_grew_ = true;
      *progress = true;
      continue;
    }
    if (inbox_.empty()) inbox_.Consume(0);  // frees the reservation
    if (r.kind == IoResult::Kind::kError) return r.error;
    if (r.kind == IoResult::Kind::kEof) {
      peer_closed_ = true;
      *progress = true;
    }
    break;
  }
  return Status::OK();
}

void TlsRelay::Consume(size_t n) {
  inbox_.Consume(std::min(n, inbox_.size()));
  if (tls_ && !finished_) tls_->Yield();  // reading may resume
}

Status TlsRelay::Send(std::string_view plaintext, bool hold) {
  assert(handshake_done_);
  if (finished_ || !tls_) return Status::Unavailable("the TLS connection is closed");
  if (out_.empty()) {
    // Straight into the stream while the socket takes it; the rest waits, in order.
    tls_->set_hold(hold);
    IoResult r = tls_->Write(plaintext.data(), plaintext.size());
    tls_->set_hold(false);
    if (r.kind == IoResult::Kind::kError) return r.error;
    if (r.kind == IoResult::Kind::kBytes) plaintext.remove_prefix(r.n);
  }
  if (!plaintext.empty()) {
    out_.Append(plaintext);
    tls_->Yield();
  }
  return Status::OK();
}

void TlsRelay::ReleaseHeld() {
  if (tls_raw_) tls_raw_->PushHeld();
}

void TlsRelay::Attach(Relay::Side plain, const char* plain_name, PipePool* pool) {
  assert(tls_ && !relay_);
  if (!pool) {
    // The pump's copy buffer; TLS never splices, so no pipe is taken from it.
    own_pool_ = std::make_unique<PipePool>(PipePool::kSmallPipe, 1);
    pool = own_pool_.get();
  }
  std::string to_plain(inbox_.data(), inbox_.size());
  inbox_.Consume(inbox_.size());
  inbox_at_attach_ = to_plain.size();
  std::string to_tls(out_.data(), out_.size());
  out_.Consume(out_.size());
  relay_ =
      std::make_unique<Relay>(pool, std::move(tls_), SideTransport(std::move(plain)), tls_name_,
                              plain_name, std::move(to_tls), std::move(to_plain), [this](Status s) {
                                tls_raw_ = nullptr;  // closed with the relay
                                Finish(std::move(s));
                              });
  if (finished_) return;
  relay_->Start();
}

void TlsRelay::Abort(std::string_view last) {
  if (finished_) return;
  finished_ = true;
  if (tls_raw_) tls_raw_->Abort(last);
  if (relay_) {
    relay_->Stop();
    tls_raw_ = nullptr;
  }
}

void TlsRelay::Finish(Status status) {
  if (finished_) return;
  finished_ = true;
  if (tls_) tls_->SetCallback(nullptr);
  auto done = std::move(cb_.on_done);
  if (done) done(std::move(status));  // may destroy this
}

const TlsRelay::Counters& TlsRelay::counters() const {
  if (relay_) {
    counters_.tls_to_plain = relay_->counters().a_to_b + inbox_at_attach_;
    counters_.plain_to_tls = relay_->counters().b_to_a;
  }
  return counters_;
}

uint64_t TlsRelay::last_activity_ms() const {
  return relay_ ? relay_->last_activity_ms() : last_activity_ms_;
}

size_t TlsRelay::buffered() const {
  return inbox_.size() + out_.size() + (relay_ ? relay_->buffered() : 0) +
         (tls_raw_ ? tls_raw_->buffered() : 0);
}

}  // namespace brokerproxy::proxy
