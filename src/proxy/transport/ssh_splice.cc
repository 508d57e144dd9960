#include "proxy/transport/ssh_splice.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace brokerproxy::proxy {
namespace {

// ssh_event_dopoll rounds per socket event (each reads at most 4 KiB). epoll is level-triggered,
// so what is left is reported again on the next loop iteration, after other sessions had a turn.
constexpr int kMaxRounds = 64;
// Largest socket read handed to ssh_channel_write at once, and reads per socket event.
constexpr size_t kChunk = 64 * 1024;
constexpr int kReadsPerEvent = 4;

// One buffer for reads out of libssh: loop-thread only, and never used across a callback.
char g_chunk[kChunk];
// One buffer for socket reads, handed to libssh as they are (no copy unless libssh takes only
// part). It stays in use across libssh calls, which may run callbacks, so it is not g_chunk:
// only ReadSocket() uses it, and ReadSocket() runs only from a socket event, never nested.
char g_from_socket[kChunk];

bool WouldBlock(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }

}  // namespace

// ---- SshTransport ----

Result<std::unique_ptr<SshTransport>> SshTransport::Create(SshSessionPtr session,
                                                           loop::HandlePtr<loop::Poll> poll) {
  ssh_event event = ssh_event_new();
  if (event == nullptr) return Status::Internal("ssh_event_new failed");
  if (ssh_event_add_session(event, session.get()) != SSH_OK) {
    ssh_event_free(event);
    return SshError(session.get(), "ssh_event_add_session");
  }
  return std::unique_ptr<SshTransport>(
      new SshTransport(std::move(session), std::move(poll), event));
}

SshTransport::~SshTransport() {
  // libuv: never close an fd an active poll watches. libssh closes it in ssh_free().
  poll_.reset();
  if (event_) {
    ssh_event_remove_session(event_, session_.get());
    ssh_event_free(event_);
  }
  if (disconnect_on_close_ && alive()) ssh_disconnect(session_.get());
  session_.reset();
}

void SshTransport::Start(std::function<void(int status)> on_event) {
  on_event_ = std::move(on_event);
  poll_->Start(UV_READABLE, [this](int status, int) {
    // The owner may destroy this transport inside; nothing here touches it afterwards.
    std::function<void(int)> cb = on_event_;
    cb(status);
  });
  UpdateEvents();
}

Status SshTransport::Process(const std::function<void()>& after_round) {
  // Paused: leave what the peer sent in the kernel (processing it would read it). Our own
  // output went out when it was queued (libssh tries at once), or goes out on resuming.
  for (int i = 0; i < kMaxRounds && !paused_; ++i) {
    int rc = ssh_event_dopoll(event_, 0);
    if (after_round && rc != SSH_ERROR && alive()) after_round();
    if (rc == SSH_ERROR) break;
    if (rc == SSH_AGAIN) break;
    if (!alive()) break;
  }
  int status = ssh_get_status(session_.get());
  if (status & SSH_CLOSED_ERROR) return SshError(session_.get(), "ssh session failed");
  if (status & SSH_CLOSED) return Status::Unavailable("the peer closed the ssh session");
  return Status::OK();
}

void SshTransport::UpdateEvents() {
  if (!poll_) return;
  // Paused: nothing at all (Process() would not flush either, so writability would spin).
  int events = 0;
  if (!paused_) {
    events = UV_READABLE;
    if (ssh_get_poll_flags(session_.get()) & SSH_WRITE_PENDING) events |= UV_WRITABLE;
  }
  poll_->SetEvents(events);
}

void SshTransport::SetPaused(bool paused) {
  paused_ = paused;
  UpdateEvents();
}

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

void ChannelSplice::Attach(loop::HandlePtr<loop::Poll> socket, loop::HandlePtr<loop::Poll> out,
                           std::string to_socket, std::string to_channel) {
  in_ = std::move(socket);
  out_ = std::move(out);
  loop_ = &in_->loop();
  to_socket_ = std::move(to_socket);
  to_socket_off_ = 0;
  to_channel_ = std::move(to_channel);
  Touch();
  loop::Poll* in = in_.get();
  in_->Start(0, [this, in](int status, int events) { OnSocketEvent(in, status, events); });
  if (out_) {
    loop::Poll* out = out_.get();
    out_->Start(0, [this, out](int status, int events) { OnSocketEvent(out, status, events); });
  }
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
  // Straight to the socket when nothing is queued before it (the common case).
  if (self->to_socket_off_ == self->to_socket_.size()) {
    self->to_socket_.clear();
    self->to_socket_off_ = 0;
    while (consumed < len) {
      ssize_t n = ::write(self->out_fd(), p + consumed, len - consumed);
      if (n > 0) {
        consumed += n;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      break;  // full, or an error the service step will see on the next write
    }
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

void ChannelSplice::OnSocketEvent(loop::Poll* poll, int status, int events) {
  if (finished_) return;
  if (status < 0) {
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(poll->fd(), SOL_SOCKET, SO_ERROR, &err, &len);
    Finish(PosixError("socket", err ? err : EIO));
  } else {
    if (events & UV_WRITABLE) FlushToSocket();
    if (!finished_ && (events & (UV_READABLE | UV_DISCONNECT))) ReadSocket();
  }
  std::function<void()> kick = kick_;
  kick();  // the owner's service step; may destroy this splice
}

bool ChannelSplice::FlushToSocket() {
  while (to_socket_off_ < to_socket_.size()) {
    ssize_t n =
        ::write(out_fd(), to_socket_.data() + to_socket_off_, to_socket_.size() - to_socket_off_);
    if (n > 0) {
      to_socket_off_ += n;
      Touch();
      continue;
    }
    if (n < 0 && WouldBlock(errno)) {
      // Keep the buffer compact: what was written goes, so it never outgrows kToSocketCap.
      to_socket_.erase(0, to_socket_off_);
      to_socket_off_ = 0;
      return true;
    }
    Finish(PosixError("writing to the socket", n < 0 ? errno : EIO));
    return false;
  }
  to_socket_.clear();
  to_socket_off_ = 0;
  return true;
}

void ChannelSplice::DrainRetained() {
  // Only what libssh already holds: a read on an empty channel buffer would process packets.
  while (retained_ > 0 && !finished_ && pending_to_socket() < kToSocketCap / 2) {
    size_t want = std::min({retained_, kChunk, kToSocketCap - pending_to_socket()});
    int n = ssh_channel_read_nonblocking(channel_, g_chunk, static_cast<uint32_t>(want), 0);
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

void ChannelSplice::PushPending() {
  if (to_channel_.empty()) return;
  to_channel_.erase(0, WriteChannel(to_channel_.data(), to_channel_.size()));
}

void ChannelSplice::ReadSocket() {
  for (int i = 0; i < kReadsPerEvent && !finished_; ++i) {
    if (socket_eof_ || peer_closed_ || !to_channel_.empty()) return;
    uint32_t window = ssh_channel_window_size(channel_);
    if (window == 0) return;
    size_t want = std::min<size_t>(window, kChunk);
    ssize_t n = ::read(in_->fd(), g_from_socket, want);
    if (n < 0) {
      if (WouldBlock(errno)) return;
      Finish(PosixError("reading from the socket", errno));
      return;
    }
    if (n == 0) {
      socket_eof_ = true;
      return;
    }
    size_t taken = WriteChannel(g_from_socket, n);  // may run callbacks, for this channel too
    if (taken < static_cast<size_t>(n)) to_channel_.assign(g_from_socket + taken, n - taken);
  }
}

void ChannelSplice::Service() {
  if (finished_ || !in_) return;
  if (!FlushToSocket()) return;
  DrainRetained();
  if (finished_) return;
  PushPending();
  if (finished_) return;
  // The peer's EOF reaches the socket once everything before it was written.
  if (peer_eof_ && !socket_shut_ && retained_ == 0 && pending_to_socket() == 0) {
    if (out_) {
      out_.reset();  // a pipe (stdout): closing it is its EOF
    } else {
      ::shutdown(in_->fd(), SHUT_WR);
    }
    socket_shut_ = true;
  }
  // The socket's EOF reaches the peer once libssh took everything before it.
  if (socket_eof_ && to_channel_.empty() && !eof_sent_ && !peer_closed_) {
    if (ssh_channel_send_eof(channel_) == SSH_ERROR && !peer_closed_) {
      Finish(SshError(ssh_channel_get_session(channel_), "sending EOF on the channel"));
      return;
    }
    eof_sent_ = true;
  }
  bool up_done = socket_shut_;
  bool down_done = eof_sent_ || peer_closed_;
  if (up_done && down_done) {
    Finish(Status::OK());
    return;
  }
  UpdateInterest();
}

void ChannelSplice::UpdateInterest() {
  if (!in_ || finished_) return;
  int read = 0, write = 0;
  if (!socket_eof_ && !peer_closed_ && to_channel_.empty() &&
      ssh_channel_window_size(channel_) > 0) {
    read = UV_READABLE;
  }
  if (pending_to_socket() > 0 && !socket_shut_) write = UV_WRITABLE;
  if (out_) {
    in_->SetEvents(read);
    out_->SetEvents(write);
  } else {
    in_->SetEvents(read | write);
  }
}

void ChannelSplice::Fail(Status status) { Finish(std::move(status)); }

void ChannelSplice::Finish(Status status) {
  if (finished_) return;
  finished_ = true;
  status_ = std::move(status);
  if (in_) in_->Stop();
  if (out_) out_->Stop();
}

}  // namespace brokerproxy::proxy
