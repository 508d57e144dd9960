// Transports: the endpoints the one byte pump (relay.h) moves bytes between.
//
// Every byte brokerproxy moves itself goes through Relay: two directions, each reading from
// one transport into a buffer (or a kernel pipe) and writing it to the other. A transport hides
// what an endpoint is: a plain socket or a stdio pair (SocketTransport, here), a TLS stream
// (TlsTransport, tls_relay.h), and an SSH channel (SshChannelTransport, ssh_splice.h). The pump
// alone owns the rules every endpoint shares: one buffer in flight per direction (the watermark),
// half-close, per-direction counters and last-activity time.
//
// EdgeSocket wraps the edge-triggered rules of the Reactor (loop/reactor.h) once: its calls
// clear the IoWatch's readable/writable flag when the kernel says EAGAIN, and report EOF,
// hangup and errors. Every transport does its socket I/O through one, TLS included (its BIO
// calls EdgeSocket::Read/Write), so no transport ever changes an epoll registration.
//
// Loop-thread only.

#ifndef BROKERPROXY_PROXY_TRANSPORT_TRANSPORT_H_
#define BROKERPROXY_PROXY_TRANSPORT_TRANSPORT_H_

#include <sys/types.h>

#include <cstddef>
#include <string>

#include "loop/reactor.h"
#include "loop/status.h"

namespace brokerproxy::proxy {

// One fd in the reactor, with the edge-triggered bookkeeping done for its users. The results
// are bytes (> 0), 0 for the end of the stream (reads), or -errno; -EAGAIN means "not now" and
// has cleared the matching readiness flag, so the next edge (or IoWatch::Yield) brings the
// caller back. EINTR is retried inside.
class EdgeSocket {
 public:
  EdgeSocket() = default;
  // `is_socket`: send/recv and shutdown(2); false (a pipe, a tty): read/write, and closing is
  // the only way to signal the end.
  EdgeSocket(loop::IoHandle io, bool is_socket) : io_(std::move(io)), is_socket_(is_socket) {}

  loop::IoWatch* watch() const { return io_.get(); }
  loop::IoHandle& handle() { return io_; }
  int fd() const { return io_.fd(); }
  bool is_socket() const { return is_socket_; }
  bool open() const { return static_cast<bool>(io_); }
  bool readable() const { return io_ && io_->readable(); }
  bool writable() const { return io_ && io_->writable(); }
  bool hangup() const { return io_ && io_->hangup(); }

  // A read that returns less than `cap` from a socket (before a hangup) also clears the
  // readable flag: a socket read returns all that is queued, so anything newer brings a new
  // edge. (Not a tty: it returns one line at a time. Not after a hangup: the end of the stream
  // must still be read.)
  ssize_t Read(char* buf, size_t cap);
  // send(MSG_NOSIGNAL | `flags`) on a socket (a vanished peer must not raise SIGPIPE), else
  // write.
  ssize_t Write(const char* data, size_t len, int flags = 0);
  // splice(2) from this socket into a pipe's write end, or from a pipe's read end into it.
  ssize_t SpliceIn(int pipe_write_fd, size_t len);
  ssize_t SpliceOut(int pipe_read_fd, size_t len);
  // shutdown(SHUT_WR) of a socket; anything else is closed (then open() is false).
  void ShutdownWrite();
  void Close() { io_.reset(); }

 private:
  loop::IoHandle io_;
  bool is_socket_ = true;
};

// What a read or write of a transport did.
struct IoResult {
  enum class Kind { kBytes, kAgain, kEof, kError };
  static IoResult Bytes(size_t n) { return {Kind::kBytes, n, 0, Status::OK()}; }
  static IoResult Again() { return {Kind::kAgain, 0, 0, Status::OK()}; }
  static IoResult Eof() { return {Kind::kEof, 0, 0, Status::OK()}; }
  // A system call failed: the pump names the side ("reading from client").
  static IoResult Errno(int err) { return {Kind::kError, 0, err, Status::OK()}; }
  // Any other failure, described by the transport (a TLS alert, a truncation).
  static IoResult Error(Status s) { return {Kind::kError, 0, 0, std::move(s)}; }

  Kind kind;
  size_t n;  // kBytes: how many (> 0)
  int err;   // kError from a system call
  Status error;
};

// An endpoint of the pump. Its contract:
//   - Read() fills at most `cap` bytes of the pump's buffer: bytes, kAgain (nothing now: a
//     readiness callback comes when there may be), kEof (the peer's clean end of stream: a FIN,
//     a TLS close_notify, an SSH channel EOF), or kError (a reset, a truncated TLS stream...).
//   - Write() takes bytes from the pump's buffer: a count (possibly short), kAgain (full: a
//     callback comes when it may take more) or kError. A kAgain write must be retried with the
//     same bytes (TLS keeps a record half sent).
//   - readable()/writable() say whether a Read()/Write() may make progress without a new
//     callback; false ones are cleared only by kAgain results, so a pump that stops on them is
//     always woken again.
//   - ShutdownWrite() passes the end of the stream on (SHUT_WR, close_notify, channel EOF).
//     `last`: the other direction is over too, so the pump will close the transport next (a
//     socket then skips its shutdown, since close sends the FIN). kAgain: retry once writable.
//   - splice_socket(): the socket under a transport that moves raw bytes, so two of them can
//     splice(2) between each other; null for anything that transforms bytes (TLS, SSH).
//   - SetCallback() routes every readiness event of the transport's fds to the pump; Yield()
//     asks for a callback on a later loop turn without a new edge.
// An SSH channel (SshChannelTransport, ssh_splice.h) is a transport whose Read/Write are
// ssh_channel_read/write_nonblocking, whose readiness is what libssh's callbacks and the
// session's service step recorded (bytes retained, EOF, the peer's window), whose Yield() yields
// the socket on the pump's other side, and which has no splice_socket().
class Transport {
 public:
  virtual ~Transport() = default;

  virtual IoResult Read(char* buf, size_t cap) = 0;
  virtual IoResult Write(const char* data, size_t len) = 0;
  virtual bool readable() const = 0;
  virtual bool writable() const = 0;
  virtual IoResult ShutdownWrite(bool last) = 0;
  virtual EdgeSocket* splice_socket() { return nullptr; }
  virtual void SetCallback(const loop::IoWatch::Callback& cb) = 0;
  virtual void Yield() = 0;
  virtual loop::Loop& loop() const = 0;
  // Whether the transport's read side is a socket (short reads prove it empty).
  virtual bool stream() const { return true; }
};

// A plain socket (one fd both ways) or a stdio pair (separate fds, not sockets).
class SocketTransport : public Transport {
 public:
  // None yet (closed): a place for one, e.g. inside a Relay.
  SocketTransport() = default;
  explicit SocketTransport(loop::IoHandle socket) : in_(std::move(socket), true) {}
  SocketTransport(loop::IoHandle read, loop::IoHandle write)
      : in_(std::move(read), false), out_(std::move(write), false), pair_(true) {}

  IoResult Read(char* buf, size_t cap) override;
  IoResult Write(const char* data, size_t len) override;
  bool readable() const override { return in_.readable(); }
  bool writable() const override { return out().writable(); }
  IoResult ShutdownWrite(bool last) override;
  EdgeSocket* splice_socket() override { return pair_ ? nullptr : &in_; }
  void SetCallback(const loop::IoWatch::Callback& cb) override;
  void Yield() override;
  loop::Loop& loop() const override { return in_.watch()->reactor().loop(); }
  bool stream() const override { return !pair_; }
  // Closes the fds now.
  void Close() {
    in_.Close();
    out_.Close();
  }

 private:
  const EdgeSocket& out() const { return pair_ ? out_ : in_; }
  EdgeSocket& out() { return pair_ ? out_ : in_; }

  EdgeSocket in_;
  EdgeSocket out_;  // a stdio pair's write side
  bool pair_ = false;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TRANSPORT_TRANSPORT_H_
