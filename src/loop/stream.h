// Stream, Tcp, Pipe: libuv streams with owned write buffers.
//
// Callbacks follow libuv's contract with two additions: a call that fails at once returns the
// error and never invokes its callback, and no callback is invoked after the handle's
// HandlePtr was dropped (cancelled writes and connects are swallowed). Every write owns its
// bytes until libuv is done with them, so the caller may free its copy right away.
//
// Loop-thread only; lifetime rules in loop/handle.h.

#ifndef BROKERPROXY_LOOP_STREAM_H_
#define BROKERPROXY_LOOP_STREAM_H_

#include <sys/socket.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "loop/handle.h"

namespace brokerproxy::loop {

class Stream : public HandleBase {
 public:
  // Bytes read; valid only during the call.
  using DataCallback = std::function<void(std::string_view data)>;
  // End of the read side: OK for a clean EOF, an error otherwise. Reading has stopped.
  using EndCallback = std::function<void(Status status)>;
  using DoneCallback = std::function<void(Status status)>;

  // Default size of the buffer each read fills (allocated on the first ReadStart()).
  static constexpr size_t kDefaultReadBufferSize = 64 * 1024;

  Status ReadStart(DataCallback on_data, EndCallback on_end);
  void ReadStop();
  bool reading() const { return reading_; }
  // REQUIRES: called before the first ReadStart().
  void SetReadBufferSize(size_t size) { read_buffer_size_ = size; }

  // Queues `data`; `cb` (optional) runs once it was written or failed.
  Status Write(std::string data, DoneCallback cb = nullptr);
  // Writes what the kernel takes right now, without queueing; returns the byte count (0 when
  // the socket is full or writes are already queued).
  Result<size_t> TryWrite(std::string_view data);
  // Bytes queued and not yet written.
  size_t WriteQueueSize() const { return uv_stream_get_write_queue_size(stream_); }
  // Half-close: shuts down writing once queued writes are done.
  Status Shutdown(DoneCallback cb = nullptr);

  // `cb` runs once per incoming connection (or with an error); call Accept() from it.
  Status Listen(int backlog, DoneCallback cb);

  // The OS fd, or -1.
  int fd() const;

 protected:
  Stream(Loop& loop, uv_stream_t* s)
      : HandleBase(loop, reinterpret_cast<uv_handle_t*>(s)), stream_(s) {}
  void OnClosing() override;
  uv_stream_t* stream_;

 private:
  static void OnAlloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf) noexcept;
  static void OnRead(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) noexcept;
  static void OnConnection(uv_stream_t* s, int status) noexcept;

  DataCallback on_data_;
  EndCallback on_end_;
  DoneCallback on_connection_;
  std::unique_ptr<char[]> read_buffer_;
  size_t read_buffer_size_ = kDefaultReadBufferSize;
  bool reading_ = false;
};

class Tcp final : public Stream {
 public:
  static Result<HandlePtr<Tcp>> Create(Loop& loop);

  Status Bind(const sockaddr* addr, unsigned flags = 0);
  // Adopts a connected or listening socket fd (takes ownership).
  Status Open(int fd);
  // REQUIRES: called from the Listen() callback of this handle.
  Result<HandlePtr<Tcp>> Accept();
  Status Connect(const sockaddr* addr, DoneCallback cb);
  Status NoDelay(bool enable);
  Status KeepAlive(bool enable, unsigned delay_s);
  Result<sockaddr_storage> SockName() const;
  Result<sockaddr_storage> PeerName() const;

 private:
  explicit Tcp(Loop& loop) : Stream(loop, reinterpret_cast<uv_stream_t*>(&tcp_)) {}
  uv_tcp_t tcp_{};
};

class Pipe final : public Stream {
 public:
  static Result<HandlePtr<Pipe>> Create(Loop& loop);

  // Binds a Unix socket at `path` (which must not exist).
  Status Bind(const std::string& path);
  // Adopts an fd (a Unix socket, a pipe or a tty-less stdio fd). The fd is closed on close
  // unless it is 0, 1 or 2.
  Status Open(int fd);
  // REQUIRES: called from the Listen() callback of this handle.
  Result<HandlePtr<Pipe>> Accept();
  Status Connect(const std::string& path, DoneCallback cb);
  // The connected peer's credentials (SO_PEERCRED).
  Status PeerCredentials(uid_t* uid, gid_t* gid, pid_t* pid) const;

 private:
  explicit Pipe(Loop& loop) : Stream(loop, reinterpret_cast<uv_stream_t*>(&pipe_)) {}
  uv_pipe_t pipe_{};
};

// Formats "1.2.3.4:80" or "[::1]:80".
std::string FormatAddress(const sockaddr* addr);

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_STREAM_H_
