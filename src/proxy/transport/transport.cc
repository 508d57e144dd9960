#include "proxy/transport/transport.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

namespace brokerproxy::proxy {
namespace {

constexpr unsigned kSpliceFlags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;

// Runs `call` (a non-blocking read, write or splice of the socket `io`) again while a signal
// interrupts it. When it would block, the readiness it needed is spent: the edge the reactor
// reported is cleared (`read_side` names which), so the pump waits for the next one, and
// -EAGAIN is returned. Otherwise what it returned, or -errno.
template <typename Call>
ssize_t OnEdge(loop::IoWatch* io, bool read_side, Call call) {
  for (;;) {
    ssize_t n = call();
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    // EAGAIN also when the pipe of a splice is full, but the pump splices into empty pipes only.
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (read_side) {
        io->ClearReadable();
      } else {
        io->ClearWritable();
      }
      return -EAGAIN;
    }
    return -errno;
  }
}

}  // namespace

// ---- EdgeSocket ----

ssize_t EdgeSocket::Read(char* buf, size_t cap) {
  ssize_t n = OnEdge(io_.get(), /*read_side=*/true, [&] {
    return is_socket_ ? ::recv(fd(), buf, cap, 0) : ::read(fd(), buf, cap);
  });
  // A short read drained the socket: its edge is spent too (unless it hung up, which stays).
  if (n > 0 && is_socket_ && static_cast<size_t>(n) < cap && !io_->hangup()) io_->ClearReadable();
  return n;
}

ssize_t EdgeSocket::Write(const char* data, size_t len, int flags) {
  return OnEdge(io_.get(), /*read_side=*/false, [&] {
    return is_socket_ ? ::send(fd(), data, len, MSG_NOSIGNAL | flags) : ::write(fd(), data, len);
  });
}

ssize_t EdgeSocket::SpliceIn(int pipe_write_fd, size_t len) {
  return OnEdge(io_.get(), /*read_side=*/true,
                [&] { return ::splice(fd(), nullptr, pipe_write_fd, nullptr, len, kSpliceFlags); });
}

ssize_t EdgeSocket::SpliceOut(int pipe_read_fd, size_t len) {
  return OnEdge(io_.get(), /*read_side=*/false,
                [&] { return ::splice(pipe_read_fd, nullptr, fd(), nullptr, len, kSpliceFlags); });
}

void EdgeSocket::ShutdownWrite() {
  if (!io_) return;
  if (is_socket_) {
    ::shutdown(fd(), SHUT_WR);
  } else {
    io_.reset();  // a pipe (stdout) has no half-close: closing it is how its reader sees the end
  }
}

// ---- SocketTransport ----

IoResult SocketTransport::Read(char* buf, size_t cap) {
  ssize_t n = in_.Read(buf, cap);
  if (n > 0) return IoResult::Bytes(static_cast<size_t>(n));
  if (n == 0) return IoResult::Eof();
  if (n == -EAGAIN) return IoResult::Again();
  return IoResult::Errno(static_cast<int>(-n));
}

IoResult SocketTransport::Write(const char* data, size_t len) {
  ssize_t n = out().Write(data, len);
  if (n > 0) return IoResult::Bytes(static_cast<size_t>(n));
  if (n == -EAGAIN || n == 0) return IoResult::Again();
  return IoResult::Errno(static_cast<int>(-n));
}

IoResult SocketTransport::ShutdownWrite(bool last) {
  // Both ways over: the pump closes the sockets next, which sends the FIN (both were read to
  // EOF, so no RST). A pipe is closed either way: that is its only end of stream.
  if (!last || !out().is_socket()) out().ShutdownWrite();
  return IoResult::Eof();
}

void SocketTransport::SetCallback(const loop::IoWatch::Callback& cb) {
  if (in_.open()) in_.watch()->SetCallback(cb);
  if (out_.open()) out_.watch()->SetCallback(cb);
}

void SocketTransport::Yield() {
  if (in_.open()) {
    in_.watch()->Yield();
  } else if (out_.open()) {
    out_.watch()->Yield();
  }
}

}  // namespace brokerproxy::proxy
