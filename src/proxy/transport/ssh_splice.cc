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
// Largest read out of libssh before Attach (ReadRaw).
constexpr size_t kChunk = 64 * 1024;

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

// ---- the socket side ----

// The socket's transport as the relay sees it, plus what the splice needs to know: when the
// peer's EOF reached the socket, and after every event, the owner's service step (which runs
// libssh, and so may reopen a window or take queued messages).
class ChannelSplice::SocketSide : public Transport {
 public:
  SocketSide(ChannelSplice* splice, std::unique_ptr<Transport> socket)
      : splice_(splice), socket_(std::move(socket)) {}

  IoResult Read(char* buf, size_t cap) override { return socket_->Read(buf, cap); }
  IoResult Write(const char* data, size_t len) override { return socket_->Write(data, len); }
  bool readable() const override { return socket_->readable(); }
  bool writable() const override { return socket_->writable(); }
  IoResult ShutdownWrite(bool last) override {
    IoResult r = socket_->ShutdownWrite(last);
    if (r.kind != IoResult::Kind::kAgain && r.kind != IoResult::Kind::kError) {
      splice_->socket_shut_ = true;
    }
    return r;
  }
  EdgeSocket* splice_socket() override { return nullptr; }  // the other side is a channel
  void Yield() override { socket_->Yield(); }
  loop::Loop& loop() const override { return socket_->loop(); }
  bool stream() const override { return socket_->stream(); }

  void SetCallback(const loop::IoWatch::Callback& cb) override {
    ChannelSplice* splice = splice_;
    socket_->SetCallback([splice, cb](loop::IoWatch* watch) {
      // The pump may end the relay (and so this transport) inside: nothing here is touched
      // after it but the splice, which only the owner destroys, in `kick`.
      std::function<void()> kick = splice->kick_;
      // A failed socket (EPOLLERR) shows as readable and writable, but a read may not be due
      // (window closed) and a write neither (nothing pending): ask for the error at once.
      int err = watch && watch->hangup() ? SocketError(watch->fd()) : 0;
      if (err != 0) {
        splice->Finish(PosixError("socket", err));
      } else {
        cb(watch);
      }
      kick();  // the owner's service step; may destroy the splice
    });
  }

 private:
  ChannelSplice* splice_;
  std::unique_ptr<Transport> socket_;
};

// ---- SshChannelTransport ----

IoResult SshChannelTransport::Read(char* buf, size_t cap) { return splice_->ReadChannel(buf, cap); }

IoResult SshChannelTransport::Write(const char* data, size_t len) {
  return splice_->WriteChannel(data, len);
}

bool SshChannelTransport::readable() const {
  return !splice_->finished_ && (splice_->retained_ > 0 || splice_->peer_eof_);
}

bool SshChannelTransport::writable() const {
  return !splice_->finished_ && !splice_->window_blocked_;
}

IoResult SshChannelTransport::ShutdownWrite(bool) { return splice_->SendChannelEof(); }

void SshChannelTransport::SetCallback(const loop::IoWatch::Callback& cb) { splice_->pump_ = cb; }

void SshChannelTransport::Yield() { splice_->YieldPump(); }

// ---- ChannelSplice ----

ChannelSplice::ChannelSplice(ssh_channel channel, std::function<void()> kick, PipePool* pool)
    : channel_(channel), kick_(std::move(kick)), pool_(pool) {
  if (pool_ == nullptr) {
    // Only a copy buffer is ever taken (a channel cannot splice(2)).
    own_pool_ = std::make_unique<PipePool>(PipePool::kSmallPipe, 1);
    pool_ = own_pool_.get();
  }
  callbacks_.userdata = this;
  callbacks_.channel_data_function = &ChannelSplice::OnData;
  callbacks_.channel_eof_function = &ChannelSplice::OnEof;
  callbacks_.channel_close_function = &ChannelSplice::OnClose;
  ssh_callbacks_init(&callbacks_);
  ssh_set_channel_callbacks(channel_, &callbacks_);
}

ChannelSplice::~ChannelSplice() {
  relay_.reset();  // closes the socket(s); no libssh call in there
  // No callback may reach this object once it is gone: unhook first. ssh_channel_free() sends
  // CLOSE if the channel is still open; libssh frees its half once the peer's CLOSE arrives.
  ssh_remove_channel_callbacks(channel_, &callbacks_);
  ssh_channel_free(channel_);
}

void ChannelSplice::Attach(loop::IoHandle socket, loop::IoHandle out, std::string to_socket,
                           std::string to_channel) {
  loop::Loop* loop = &socket->reactor().loop();
  Relay::Side side =
      out ? Relay::Side(std::move(socket), std::move(out)) : Relay::Side(std::move(socket));
  auto sock = std::make_unique<SocketSide>(this, SideTransport(std::move(side)));
  socket_ = sock.get();
  relay_ = std::make_unique<Relay>(pool_, std::move(sock),
                                   std::make_unique<SshChannelTransport>(this, loop), "the socket",
                                   "the channel", std::move(to_socket), std::move(to_channel),
                                   [this](Status s) { OnRelayDone(std::move(s)); });
  if (finished_) {
    relay_->Stop();  // failed before it was attached: close the socket at once
    socket_ = nullptr;
    return;
  }
  relay_->Start();
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

// ---- the channel side ----

int ChannelSplice::OnData(ssh_session, ssh_channel, void* data, uint32_t len, int is_stderr,
                          void* userdata) noexcept {
  (void)data;
  auto* self = static_cast<ChannelSplice*>(userdata);
  if (is_stderr) return static_cast<int>(len);  // direct-tcpip has no stderr; drop it
  // Nowhere to go any more (or a peer that sends after its own EOF): dropped.
  if (self->finished_ || self->socket_shut_) return static_cast<int>(len);
  // Consume nothing: libssh keeps the bytes (`len` is all it holds for this channel) until the
  // pump has room for them, and grows the window only as they are read.
  self->retained_ = len;
  self->wake_ = true;
  self->YieldPump();
  return 0;
}

void ChannelSplice::OnEof(ssh_session, ssh_channel, void* userdata) noexcept {
  auto* self = static_cast<ChannelSplice*>(userdata);
  self->peer_eof_ = true;
  self->wake_ = true;
  self->YieldPump();
}

void ChannelSplice::OnClose(ssh_session, ssh_channel, void* userdata) noexcept {
  auto* self = static_cast<ChannelSplice*>(userdata);
  self->peer_eof_ = true;
  self->peer_closed_ = true;
  self->wake_ = true;
  self->YieldPump();
}

void ChannelSplice::YieldPump() {
  // The pump's callback is the same on both of its transports: the socket's watch brings it.
  if (socket_ != nullptr && !finished_) socket_->Yield();
}

uint32_t ChannelSplice::ChannelWindow() const { return ssh_channel_window_size(channel_); }

IoResult ChannelSplice::ReadChannel(char* buf, size_t cap) {
  // Only what libssh already holds: a read on an empty channel buffer would process packets.
  if (retained_ > 0) {
    size_t want = std::min({retained_, cap, size_t{UINT32_MAX}});
    int n = ssh_channel_read_nonblocking(channel_, buf, static_cast<uint32_t>(want), 0);
    if (n > 0) {
      retained_ = retained_ > static_cast<size_t>(n) ? retained_ - n : 0;
      return IoResult::Bytes(static_cast<size_t>(n));
    }
    retained_ = 0;  // nothing there after all (EOF, or consumed meanwhile)
    if (n == SSH_EOF) return IoResult::Eof();
    if (n == SSH_ERROR && !peer_closed_) {
      return IoResult::Error(
          SshError(ssh_channel_get_session(channel_), "reading from the channel"));
    }
  }
  if (peer_eof_) return IoResult::Eof();
  return IoResult::Again();  // readable() is false now: OnData brings the pump back
}

IoResult ChannelSplice::WriteChannel(const char* data, size_t len) {
  size_t done = 0;
  // Nobody is left to read after the peer's close: hold the bytes; the splice ends once the
  // socket got what the peer sent before (Service).
  while (done < len && !peer_closed_) {
    uint32_t window = ChannelWindow();
    if (window == 0) break;  // the service step calls the pump back once it reopens
    uint32_t want = static_cast<uint32_t>(std::min<size_t>(len - done, window));
    int n = ssh_channel_write(channel_, data + done, want);  // may run callbacks
    if (n < 0) {
      if (peer_closed_) break;
      return IoResult::Error(SshError(ssh_channel_get_session(channel_), "writing to the channel"));
    }
    if (n == 0) break;  // a key exchange in progress: retry later
    done += static_cast<size_t>(n);
  }
  if (done > 0) return IoResult::Bytes(done);
  window_blocked_ = true;
  return IoResult::Again();
}

IoResult ChannelSplice::SendChannelEof() {
  if (!peer_closed_) {
    if (ssh_channel_send_eof(channel_) == SSH_ERROR && !peer_closed_) {
      return IoResult::Error(
          SshError(ssh_channel_get_session(channel_), "sending EOF on the channel"));
    }
    eof_sent_ = true;
  }
  return IoResult::Eof();
}

// ---- joining them ----

void ChannelSplice::Service() {
  if (finished_ || !relay_) return;
  // libssh 0.10 has no window-adjust callback: a window that reopened shows only here.
  if (window_blocked_ && !peer_closed_ && ChannelWindow() > 0) {
    window_blocked_ = false;
    wake_ = true;
  }
  if (wake_) {
    wake_ = false;
    loop::IoWatch::Callback pump = pump_;
    pump(nullptr);  // outside libssh: the pump may call it
    if (finished_) return;
  }
  // The peer closed the channel and everything it sent reached the socket: nothing more can
  // move (what the socket still sends has no reader).
  if (peer_closed_ && socket_shut_) Finish(Status::OK());
}

void ChannelSplice::Fail(Status status) { Finish(std::move(status)); }

void ChannelSplice::OnRelayDone(Status status) {
  if (finished_) return;
  finished_ = true;
  status_ = std::move(status);
  socket_ = nullptr;  // gone with the relay's transports
}

void ChannelSplice::Finish(Status status) {
  if (finished_) return;
  finished_ = true;
  status_ = std::move(status);
  socket_ = nullptr;
  if (relay_) relay_->Stop();  // closes the socket(s); the counters stay
}

}  // namespace brokerproxy::proxy
