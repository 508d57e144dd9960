// Running a nonblocking libssh session on the reactor (loop/reactor.h), and splicing its
// channels to sockets. Shared by the embedded endpoint (server side, ssh_server.h) and
// `connect --via` (client side, cli/ssh_tunnel.cc). docs/libraries.md, "libssh 0.10", has the
// facts this relies on.
//
// How libssh is driven (SshTransport):
//   - The session's socket is registered once in the edge-triggered reactor (a duplicate of
//     libssh's fd, see SshTransport), never in a uv_tcp_t or uv_poll: libssh reads and writes
//     its fd itself. There is no interest to
//     keep up to date: an edge says the socket became readable, or writable again after libssh
//     found it full (its output stays pending, SSH_WRITE_PENDING, until then).
//   - After an edge, ssh_event_dopoll(ev, 0) runs until it reports nothing ready (SSH_AGAIN:
//     the socket is drained, and libssh's pending output, if any, cannot go out now), at most
//     kMaxRounds times (each round reads at most 4 KiB: libssh's fixed MAX_BUF_SIZE); past
//     that the watch yields and the rest is read on a later loop turn, after other sessions.
//     No round runs while no edge came since the last SSH_AGAIN: the owner's service step runs
//     on every channel event too, and would otherwise cost a poll() each time. The owner then
//     runs its service step, which moves channel data.
//
// Re-entrancy: almost every libssh call (channel write, read, close, send_eof, open) may
// process incoming packets, so libssh callbacks (data, eof, close, and the session's message
// callback) can fire inside any of them, for any channel. Therefore callbacks only record
// state and move bytes to our own sockets; anything that calls libssh or frees an object runs
// in the owner's service step, which is reached only from a loop callback (never from inside
// libssh). Channels are freed by the owner's reap step after their callbacks were removed.
//
// Channels are transports of the one pump (relay.h): ChannelSplice runs a Relay between an
// SshChannelTransport and the socket's SocketTransport, so the watermark (one chunk per
// direction), half-close, counters and last-activity are the pump's. What the channel adds:
//   - channel -> socket: the data callback consumes nothing; it records how many bytes libssh
//     holds for us and asks the pump to come back (Yield). The pump pulls them with
//     ssh_channel_read_nonblocking() only when it has room, so past the one chunk in flight
//     libssh retains the rest in the channel buffer and stops regrowing the window (the peer
//     stops sending). readable() says bytes are retained, since no socket edge announces them.
//   - socket -> channel: Write() hands bytes to libssh only while the peer's window is open
//     (ssh_channel_window_size > 0); a write libssh accepts only in part (window, or 0 bytes
//     during a rekey) is a short count or kAgain, and the pump keeps the rest. libssh 0.10 has
//     no window-adjust callback, so the owner's service step (after every packet batch)
//     re-checks the window and calls the pump back once it reopened. At most one window's worth
//     (the peer's, 2 MiB for OpenSSH) sits in libssh's output buffer.
//
// Loop-thread only.

#ifndef BROKERPROXY_PROXY_TRANSPORT_SSH_SPLICE_H_
#define BROKERPROXY_PROXY_TRANSPORT_SSH_SPLICE_H_

#include <libssh/callbacks.h>
#include <libssh/libssh.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "loop/loop.h"
#include "loop/reactor.h"
#include "loop/status.h"
#include "proxy/ssh/ssh_common.h"
#include "proxy/transport/relay.h"
#include "proxy/transport/transport.h"

namespace brokerproxy::proxy {

// One nonblocking libssh session and the reactor watch that drives it.
//
// Ownership: owns the session (and through it the socket fd) and an IoHandle on a duplicate
// of that fd (Sharing::kShared). libssh closes its own fd whenever it decides to (the peer's
// EOF or SSH_MSG_DISCONNECT, a failed write: inside any libssh call), so the registered fd is
// never libssh's: the epoll entry stays valid, and its number cannot be handed to another
// socket, until the handle goes. Teardown order: the handle leaves the epoll set and closes
// the duplicate first, then the session leaves its ssh_event, then ssh_free() closes libssh's
// fd (the last reference: the peer sees the FIN then). Loop-thread only.
class SshTransport {
 public:
  // REQUIRES: `session` is connected and in nonblocking mode.
  static Result<std::unique_ptr<SshTransport>> Create(SshSessionPtr session,
                                                      loop::Reactor& reactor);
  ~SshTransport();
  SshTransport(const SshTransport&) = delete;
  SshTransport& operator=(const SshTransport&) = delete;

  ssh_session session() const { return session_.get(); }

  // Starts watching the socket; `on_event` (the owner's entry point) runs after every edge on
  // it, and after a yield (see Process). It may destroy this transport.
  void Start(std::function<void()> on_event);
  // Processes what the socket has for libssh (callbacks fire inside) and sends libssh's pending
  // output if the socket takes it; does nothing while no edge came since the socket was found
  // drained. Not OK once the session failed or the peer disconnected. `after_round`, if set,
  // runs after every ssh_event_dopoll round, outside libssh (e.g. to take the messages the
  // round queued in the session).
  Status Process(const std::function<void()>& after_round = nullptr);
  // Stops (or resumes) all processing of the session, e.g. to slow down password guessing:
  // what the peer sends waits in the kernel meanwhile (the socket stays "readable", so
  // processing resumes without a new edge).
  void SetPaused(bool paused);
  bool paused() const { return paused_; }
  // True until the session closed or failed.
  bool alive() const;
  // Sends SSH_MSG_DISCONNECT when the transport is destroyed (best effort, nonblocking).
  void set_disconnect_on_close(bool v) { disconnect_on_close_ = v; }

 private:
  SshTransport(SshSessionPtr session, loop::IoHandle io, ssh_event event)
      : session_(std::move(session)), io_(std::move(io)), event_(event) {}
  // Whether an edge (or a yield) came since libssh last found nothing to read and nothing it
  // could write.
  bool Ready() const;

  SshSessionPtr session_;
  loop::IoHandle io_;
  ssh_event event_ = nullptr;
  std::function<void()> on_event_;
  bool paused_ = false;
  bool disconnect_on_close_ = false;
};

class ChannelSplice;

// An SSH channel as a transport of the pump (transport.h): Read/Write are
// ssh_channel_read/write_nonblocking, ShutdownWrite is SSH_MSG_CHANNEL_EOF, and readiness is
// the channel's state as the libssh callbacks and the owner's service step recorded it (see
// ChannelSplice). Yield() yields the socket's watch: the pump's callback is the same for both
// of its transports. Its calls run libssh, so the pump must call them only outside libssh
// (from the reactor, a yield, or the owner's service step). Owned by the splice's Relay; the
// channel and its callbacks stay the splice's.
class SshChannelTransport : public Transport {
 public:
  SshChannelTransport(ChannelSplice* splice, loop::Loop* loop) : splice_(splice), loop_(loop) {}

  IoResult Read(char* buf, size_t cap) override;
  IoResult Write(const char* data, size_t len) override;
  bool readable() const override;
  bool writable() const override;
  IoResult ShutdownWrite(bool last) override;
  void SetCallback(const loop::IoWatch::Callback& cb) override;
  void Yield() override;
  loop::Loop& loop() const override { return *loop_; }
  bool stream() const override { return false; }

 private:
  ChannelSplice* splice_;
  loop::Loop* loop_;
};

// One open SSH channel spliced to one stream socket (the job's backend on the server, a local
// connection on the client), both directions, with half-close: the peer's EOF becomes
// shutdown(SHUT_WR) of the socket once everything was written, and the socket's EOF becomes
// SSH_MSG_CHANNEL_EOF once everything was accepted by libssh. It is finished when both
// directions are, when the peer closes the channel (after flushing what it sent), or on an
// error.
//
// Until Attach(), channel data stays in libssh (bounded by the window we advertise) and can be
// read with ReadRaw() (the client reads the proxy's "OK" line that way).
//
// Shape: the channel side (ReadChannel, WriteChannel, SendChannelEof, ChannelWindow and the
// libssh callbacks, used by SshChannelTransport) and the socket's SocketTransport, joined by a
// Relay (relay.h) from Attach() on. Service() turns what the owner's service step learned (data
// retained, EOF, a window reopened, the peer's close) into calls of the pump.
//
// Ownership: owns the channel (freed, after its callbacks were removed, by the destructor) and
// the Relay (and through it the socket's IoHandle(s)). The owner must destroy it only outside
// libssh calls (its reap step), and before the session. Loop-thread only.
class ChannelSplice {
 public:
  // `kick` is the owner's entry point for socket events: it runs after the pump handled an
  // event on the socket, as the last thing, and may destroy the splice. `pool`: buffers for
  // the pump (null: one of its own).
  ChannelSplice(ssh_channel channel, std::function<void()> kick, PipePool* pool = nullptr);
  ~ChannelSplice();
  ChannelSplice(const ChannelSplice&) = delete;
  ChannelSplice& operator=(const ChannelSplice&) = delete;

  ssh_channel channel() const { return channel_; }

  // Starts splicing with `socket` (a connected stream socket registered in the reactor), or
  // with a pair of fds (`out` non-empty: e.g. stdin and stdout; the peer's EOF then closes
  // `out`). Takes over the handles' callbacks; their readiness flags are kept, so bytes that
  // arrived before are read without a new edge. `to_socket` is written before anything else
  // from the channel, and `to_channel` before anything else from the socket.
  void Attach(loop::IoHandle socket, loop::IoHandle out, std::string to_socket,
              std::string to_channel);
  bool attached() const { return static_cast<bool>(relay_); }

  // Before Attach: reads up to `max` bytes the peer sent. Empty when nothing is there yet.
  Result<std::string> ReadRaw(size_t max);
  // Before Attach: writes `data` into the channel; returns the bytes libssh took (maybe 0).
  Result<size_t> WriteRaw(std::string_view data);

  // Moves what can move now. Call from the owner's service step, after every packet batch (the
  // peer's window may have reopened, data may be retained), never from inside libssh.
  void Service();

  // Ends the splice now with `status` (e.g. the backend could not be reached).
  void Fail(Status status);

  bool finished() const { return finished_; }
  // OK when both directions ended cleanly; else what ended it.
  const Status& status() const { return status_; }
  // True once one direction has ended (EOF passed on either way, or the peer closed).
  bool half_closed() const { return socket_shut_ || eof_sent_ || peer_closed_; }
  bool peer_eof() const { return peer_eof_; }
  bool peer_closed() const { return peer_closed_; }
  // Bytes moved so far: from the channel to the socket, and from the socket to the channel.
  uint64_t to_socket_bytes() const { return relay_ ? relay_->counters().b_to_a : 0; }
  uint64_t to_channel_bytes() const { return relay_ ? relay_->counters().a_to_b : 0; }
  uint64_t last_activity_ms() const { return relay_ ? relay_->last_activity_ms() : 0; }

 private:
  friend class SshChannelTransport;
  class SocketSide;

  static int OnData(ssh_session session, ssh_channel channel, void* data, uint32_t len,
                    int is_stderr, void* userdata) noexcept;
  static void OnEof(ssh_session session, ssh_channel channel, void* userdata) noexcept;
  static void OnClose(ssh_session session, ssh_channel channel, void* userdata) noexcept;

  // ---- the channel side (SshChannelTransport's calls) ----
  // Bytes the peer may still be sent now (its window).
  uint32_t ChannelWindow() const;
  IoResult ReadChannel(char* buf, size_t cap);
  IoResult WriteChannel(const char* data, size_t len);
  IoResult SendChannelEof();
  // Asks the pump to come back on a later loop turn (safe inside a libssh callback).
  void YieldPump();

  // The relay's end: records it (the owner reaps the splice).
  void OnRelayDone(Status status);
  void Finish(Status status);

  ssh_channel channel_;
  std::function<void()> kick_;
  ssh_channel_callbacks_struct callbacks_{};
  PipePool* pool_;
  std::unique_ptr<PipePool> own_pool_;
  std::unique_ptr<Relay> relay_;
  Transport* socket_ = nullptr;   // the relay's socket side, while the relay runs
  loop::IoWatch::Callback pump_;  // the relay's callback, for Service()

  size_t retained_ = 0;          // bytes libssh holds for us (offered, not consumed)
  bool window_blocked_ = false;  // a write found the window closed (or libssh took nothing)
  bool wake_ = false;            // the channel's state changed: Service() runs the pump
  bool peer_eof_ = false;        // the peer sent EOF (or closed)
  bool peer_closed_ = false;     // the peer closed the channel: nothing more can be sent to it
  bool socket_shut_ = false;     // the peer's EOF was passed on to the socket
  bool eof_sent_ = false;        // we sent EOF on the channel (socket's EOF passed on)
  bool finished_ = false;
  Status status_;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TRANSPORT_SSH_SPLICE_H_
