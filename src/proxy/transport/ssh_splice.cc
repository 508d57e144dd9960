#include "proxy/transport/ssh_splice.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

namespace brokerproxy::proxy {
namespace {

// ssh_event_dopoll rounds per Process() (each reads at most 4 KiB). What is left stays
// "readable" and the watch yields: read on a later loop turn, after other sessions had a turn.
constexpr int kMaxRounds = 64;
// Largest socket read handed to ssh_channel_write at once, and reads per service step.
constexpr size_t kChunk = 64 * 1024;
constexpr int kReadsPerStep = 4;

// One buffer for reads out of libssh: loop-thread only, and never used across a callback.
char g_chunk[kChunk];
// One buffer for socket reads, handed to libssh as they are (no copy unless libssh takes only
// part). It stays in use across libssh calls, which may run callbacks, so it is not g_chunk:
// only ReadSocket() uses it, and ReadSocket() runs only from a service step, never nested.
char g_from_socket[kChunk];

// Edge-triggered socket I/O (loop/reactor.h): a call that finds the fd not ready clears its
// readiness flag, so the next edge is what brings the splice back; a flag that is clear is
// not tried at all.
struct SocketIo {
  size_t n = 0;          // bytes moved
  bool blocked = false;  // not ready (the flag is cleared now), or the flag was clear
  bool eof = false;      // read: the peer shut down its side
  int err = 0;           // an errno that ends the splice
};

SocketIo SocketRead(loop::IoWatch* w, char* buf, size_t len) {
  SocketIo r;
  if (!w->readable()) {
    r.blocked = true;
    return r;
  }
  for (;;) {
    ssize_t n = ::read(w->fd(), buf, len);
    if (n > 0) {
      r.n = static_cast<size_t>(n);
    } else if (n == 0) {
      r.eof = true;
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      w->ClearReadable();
      r.blocked = true;
    } else {
      r.err = errno;
    }
    return r;
  }
}

// Writes as much of `data` as the fd takes.
SocketIo SocketWrite(loop::IoWatch* w, const char* data, size_t len) {
  SocketIo r;
  while (r.n < len) {
    if (!w->writable()) {
      r.blocked = true;
      return r;
    }
    ssize_t n = ::write(w->fd(), data + r.n, len - r.n);
    if (n > 0) {
      r.n += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      w->ClearWritable();
    } else {
      r.err = n < 0 ? errno : EIO;
      return r;
    }
  }
  return r;
}

}  // namespace

// ---- SshTransport ----

Result<std::unique_ptr<SshTransport>> SshTransport::Create(SshSessionPtr session,
                                                           loop::Reactor& reactor) {
  int dup = ::fcntl(ssh_get_fd(session.get()), F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return PosixError("duplicating the ssh socket", errno);
  auto io = reactor.Add(dup, nullptr, loop::Reactor::Sharing::kShared);  // closes it on error
  if (!io.ok()) return io.status();
  ssh_event event = ssh_event_new();
  if (event == nullptr) return Status::Internal("ssh_event_new failed");
  if (ssh_event_add_session(event, session.get()) != SSH_OK) {
    ssh_event_free(event);
    return SshError(session.get(), "ssh_event_add_session");
  }
  return std::unique_ptr<SshTransport>(
      new SshTransport(std::move(session), std::move(io).value(), event));
}

SshTransport::~SshTransport() {
  io_.reset();  // leaves the epoll set, closes the duplicate
  if (event_) {
    ssh_event_remove_session(event_, session_.get());
    ssh_event_free(event_);
  }
  if (disconnect_on_close_ && alive()) ssh_disconnect(session_.get());
  session_.reset();
}

void SshTransport::Start(std::function<void()> on_event) {
  on_event_ = std::move(on_event);
  io_->SetCallback([this](loop::IoWatch*) {
    // The owner may destroy this transport inside; nothing here touches it afterwards.
    std::function<void()> cb = on_event_;
    cb();
  });
  // What libssh left unread before the fd was registered gets no edge: look once.
  io_->Yield();
}

bool SshTransport::Ready() const {
  if (io_->readable()) return true;
  return io_->writable() && (ssh_get_poll_flags(session_.get()) & SSH_WRITE_PENDING) != 0;
}

Status SshTransport::Process(const std::function<void()>& after_round) {
  // Paused: leave what the peer sent in the kernel (processing it would read it). Our own
  // output went out when it was queued (libssh tries at once), or goes out on resuming.
  if (!paused_ && Ready()) {
    int i = 0;
    for (; i < kMaxRounds; ++i) {
      int rc = ssh_event_dopoll(event_, 0);
      if (after_round && rc != SSH_ERROR && alive()) after_round();
      if (rc == SSH_AGAIN) {
        // poll() found nothing to read, and nothing libssh could write: wait for an edge.
        io_->ClearReadable();
        if (ssh_get_poll_flags(session_.get()) & SSH_WRITE_PENDING) io_->ClearWritable();
        break;
      }
      if (rc == SSH_ERROR || !alive()) break;
    }
    // Cut short with the socket maybe still readable: again on a later loop turn.
    if (i == kMaxRounds && alive()) io_->Yield();
  }
  int status = ssh_get_status(session_.get());
  if (status & SSH_CLOSED_ERROR) return SshError(session_.get(), "ssh session failed");
  if (status & SSH_CLOSED) return Status::Unavailable("the peer closed the ssh session");
  return Status::OK();
}

void SshTransport::SetPaused(bool paused) { paused_ = paused; }

bool SshTransport::alive() const {
  return (ssh_get_status(session_.get()) & (SSH_CLOSED | SSH_CLOSED_ERROR)) == 0;
}

// ---- ChannelSplice ----

ChannelSplice::ChannelSplice(ssh_channel channel, std::function<void()> kick)
    : channel_(channel), kick_(std::move(kick)) {
  callbacks_.userdata = this;
  callbacks_.channel_data_function = &ChannelSplice::OnData;
  callbacks_.channel_eof_function = &ChannelSplice::OnEof;
  callbacks_.channel_close_function = &ChannelSplice::OnClose;
  ssh_callbacks_init(&callbacks_);
  ssh_set_channel_callbacks(channel_, &callbacks_);
}

ChannelSplice::~ChannelSplice() {
  // No callback may reach this object once it is gone: unhook first. ssh_channel_free() sends
  // CLOSE if the channel is still open; libssh frees its half once the peer's CLOSE arrives.
  ssh_remove_channel_callbacks(channel_, &callbacks_);
  ssh_channel_free(channel_);
  out_.reset();
  in_.reset();
}

void ChannelSplice::Attach(loop::IoHandle socket, loop::IoHandle out, std::string to_socket,
                           std::string to_channel) {
  in_ = std::move(socket);
  out_ = std::move(out);
  loop_ = &in_->reactor().loop();
  to_socket_ = std::move(to_socket);
  to_socket_off_ = 0;
  to_channel_ = std::move(to_channel);
  Touch();
  in_->SetCallback([this](loop::IoWatch* w) { OnSocketEvent(w); });
  if (out_) out_->SetCallback([this](loop::IoWatch* w) { OnSocketEvent(w); });
}

Result<std::string> ChannelSplice::ReadRaw(size_t max) {
  std::string out(std::min(max, kChunk), '\0');
  int n = ssh_channel_read_nonblocking(channel_, out.data(), static_cast<uint32_t>(out.size()), 0);
  if (n == SSH_EOF || (n == 0 && (peer_eof_ || ssh_channel_is_eof(channel_)))) {
    return Status::Unavailable("the channel was closed");
  }
  if (n < 0) return SshError(ssh_channel_get_session(channel_), "reading from the channel");
  retained_ = retained_ > static_cast<size_t>(n) ? retained_ - n : 0;
  out.resize(n);
  return out;
}

Result<size_t> ChannelSplice::WriteRaw(std::string_view data) {
  int n = ssh_channel_write(channel_, data.data(), static_cast<uint32_t>(data.size()));
  if (n < 0) return SshError(ssh_channel_get_session(channel_), "writing to the channel");
  return static_cast<size_t>(n);
}

void ChannelSplice::Touch() {
  if (loop_) last_activity_ms_ = loop_->Now();
}

// ---- the channel side ----

int ChannelSplice::OnData(ssh_session, ssh_channel, void* data, uint32_t len, int is_stderr,
                          void* userdata) noexcept {
  auto* self = static_cast<ChannelSplice*>(userdata);
  if (is_stderr) return static_cast<int>(len);  // direct-tcpip has no stderr; drop it
  // Nowhere to go any more (or a peer that sends after its own EOF): dropped.
  if (self->finished_ || self->socket_shut_) return static_cast<int>(len);
  if (!self->in_) {
    // Not spliced yet (backend still connecting, reply line not read): leave it in libssh.
    self->retained_ = len;
    return 0;
  }
  const char* p = static_cast<const char*>(data);
  size_t consumed = 0;
  // Straight to the socket when nothing is queued before it (the common case). An error is
  // seen again by the service step's next write.
  if (self->pending_to_socket() == 0) {
    self->to_socket_.clear();
    self->to_socket_off_ = 0;
    consumed = SocketWrite(self->out_watch(), p, len).n;
  }
  size_t room =
      kToSocketCap > self->pending_to_socket() ? kToSocketCap - self->pending_to_socket() : 0;
  size_t keep = std::min<size_t>(room, len - consumed);
  self->to_socket_.append(p + consumed, keep);
  consumed += keep;
  self->to_socket_bytes_ += consumed;
  self->retained_ = len - consumed;
  self->Touch();
  return static_cast<int>(consumed);
}

void ChannelSplice::OnEof(ssh_session, ssh_channel, void* userdata) noexcept {
  static_cast<ChannelSplice*>(userdata)->peer_eof_ = true;
}

void ChannelSplice::OnClose(ssh_session, ssh_channel, void* userdata) noexcept {
  auto* self = static_cast<ChannelSplice*>(userdata);
  self->peer_eof_ = true;
  self->peer_closed_ = true;
}

uint32_t ChannelSplice::ChannelWindow() const { return ssh_channel_window_size(channel_); }

int ChannelSplice::ReadChannel(char* buf, size_t max) {
  return ssh_channel_read_nonblocking(channel_, buf, static_cast<uint32_t>(max), 0);
}

size_t ChannelSplice::WriteChannel(const char* data, size_t len) {
  size_t done = 0;
  while (done < len && !finished_) {
    if (peer_closed_) return len;  // nobody left to read it
    int n = ssh_channel_write(channel_, data + done, static_cast<uint32_t>(len - done));
    if (n < 0) {
      if (!peer_closed_) {
        Finish(SshError(ssh_channel_get_session(channel_), "writing to the channel"));
      }
      return len;
    }
    if (n == 0) break;  // window closed or a key exchange in progress: retry later
    to_channel_bytes_ += n;
    done += n;
    Touch();
  }
  return done;
}

bool ChannelSplice::SendChannelEof() {
  if (ssh_channel_send_eof(channel_) == SSH_ERROR && !peer_closed_) {
    Finish(SshError(ssh_channel_get_session(channel_), "sending EOF on the channel"));
    return false;
  }
  eof_sent_ = true;
  return true;
}

// ---- the socket side ----

void ChannelSplice::OnSocketEvent(loop::IoWatch* watch) {
  if (finished_) return;
  // A failed socket (EPOLLERR) shows as readable and writable, but a read may not be due
  // (window closed) and a write neither (nothing pending): ask for the error at once.
  if (watch->hangup()) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(watch->fd(), SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0) {
      Finish(PosixError("socket", err));
    }
  }
  std::function<void()> kick = kick_;
  kick();  // the owner's service step (which moves the bytes); may destroy this splice
}

bool ChannelSplice::FlushToSocket() {
  if (pending_to_socket() == 0) {
    to_socket_.clear();
    to_socket_off_ = 0;
    return true;
  }
  SocketIo w = SocketWrite(out_watch(), to_socket_.data() + to_socket_off_, pending_to_socket());
  to_socket_off_ += w.n;
  if (w.n > 0) Touch();
  if (w.err != 0) {
    Finish(PosixError("writing to the socket", w.err));
    return false;
  }
  if (pending_to_socket() == 0) {
    to_socket_.clear();
    to_socket_off_ = 0;
  } else if (to_socket_off_ > 0) {
    // Keep the buffer compact: what was written goes, so it never outgrows kToSocketCap.
    to_socket_.erase(0, to_socket_off_);
    to_socket_off_ = 0;
  }
  return true;
}

void ChannelSplice::ReadSocket() {
  for (int i = 0; !finished_; ++i) {
    if (socket_eof_ || peer_closed_ || !to_channel_.empty()) return;
    uint32_t window = ChannelWindow();
    if (window == 0) return;  // resumed by the service step after the window-adjust arrives
    if (i == kReadsPerStep) {
      in_->Yield();  // maybe more: on a later loop turn, after the other channels
      return;
    }
    SocketIo r = SocketRead(in_.get(), g_from_socket, std::min<size_t>(window, kChunk));
    if (r.blocked) return;
    if (r.err != 0) {
      Finish(PosixError("reading from the socket", r.err));
      return;
    }
    if (r.eof) {
      socket_eof_ = true;
      return;
    }
    size_t taken = WriteChannel(g_from_socket, r.n);  // may run callbacks, for this channel too
    if (taken < r.n) to_channel_.assign(g_from_socket + taken, r.n - taken);
  }
}

void ChannelSplice::ShutSocket() {
  if (out_) {
    out_.reset();  // a pipe (stdout): closing it is its EOF
  } else {
    ::shutdown(in_.fd(), SHUT_WR);
  }
  socket_shut_ = true;
}

// ---- joining them ----

void ChannelSplice::DrainRetained() {
  // Only what libssh already holds: a read on an empty channel buffer would process packets.
  while (retained_ > 0 && !finished_ && pending_to_socket() < kToSocketCap / 2) {
    size_t want = std::min({retained_, kChunk, kToSocketCap - pending_to_socket()});
    int n = ReadChannel(g_chunk, want);
    if (n <= 0) {
      retained_ = 0;  // nothing there after all (EOF, or consumed by a callback meanwhile)
      if (n == SSH_ERROR && !peer_closed_) {
        Finish(SshError(ssh_channel_get_session(channel_), "reading from the channel"));
      }
      return;
    }
    retained_ = retained_ > static_cast<size_t>(n) ? retained_ - n : 0;
    to_socket_.append(g_chunk, n);
    to_socket_bytes_ += n;
    Touch();
    if (!FlushToSocket()) return;
  }
}

void ChannelSplice::PushPending() {
  if (to_channel_.empty()) return;
  to_channel_.erase(0, WriteChannel(to_channel_.data(), to_channel_.size()));
}

void ChannelSplice::Service() {
  if (finished_ || !in_) return;
  if (!FlushToSocket()) return;
  DrainRetained();
  if (finished_) return;
  PushPending();
  if (finished_) return;
  ReadSocket();
  if (finished_) return;
  // The peer's EOF reaches the socket once everything before it was written.
  if (peer_eof_ && !socket_shut_ && retained_ == 0 && pending_to_socket() == 0) ShutSocket();
  // The socket's EOF reaches the peer once libssh took everything before it.
  if (socket_eof_ && to_channel_.empty() && !eof_sent_ && !peer_closed_ && !SendChannelEof()) {
    return;
  }
  bool up_done = socket_shut_;
  bool down_done = eof_sent_ || peer_closed_;
  if (up_done && down_done) Finish(Status::OK());
}

void ChannelSplice::Fail(Status status) { Finish(std::move(status)); }

void ChannelSplice::Finish(Status status) {
  if (finished_) return;
  finished_ = true;
  status_ = std::move(status);
  // The sockets stay open (and registered) until the splice is destroyed, but quiet.
  if (in_) in_->SetCallback(nullptr);
  if (out_) out_->SetCallback(nullptr);
}

}  // namespace brokerproxy::proxy
