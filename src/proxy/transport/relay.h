// Moving bytes between two connected stream endpoints, both ways, with bounded memory: the one
// byte pump of brokerproxy.
//
// Relay moves each direction (a Pump) between two transports (transport.h): plain sockets and
// stdio pairs registered in the edge-triggered Reactor (loop/reactor.h), TLS streams
// (tls_relay.h), SSH channels (ssh_splice.h). Between two plain sockets bulk data goes with
// splice(2) through a kernel pipe, so bytes never enter user space and a chunk costs two syscalls;
// small chunks (and anything that is not a plain socket: a tty, pipes on stdio, TLS) go through a
// 64 KiB buffer with the transports' Read/Write, which for a few bytes is cheaper than a pipe.
// Readiness is known from the reactor's flags, so the relay never changes an epoll
// registration while it runs. The pipe is borrowed from a
// PipePool only while it holds bytes, so an idle session holds no pipe and no buffer
// (README.md, "How it works"; docs/libraries.md, "Splicing under libuv").
//
// Backpressure: a direction reads its source only while its pipe (or buffer) is empty, and
// writes only what it holds. So at most one pipe (1 MiB at most, 64 KiB once the pool's budget
// of large pipes is spent) or one 64 KiB buffer per direction is in flight whatever the peers
// do, and the rest waits in the peers' socket buffers.
//
// The same rule holds for every transport: its buffers (a TLS record, an SSH window) come on
// top of the one chunk the pump holds per direction.
//
// Half-close: EOF on a source (a FIN, a TLS close_notify) is passed on with the sink's
// ShutdownWrite (shutdown(SHUT_WR), close_notify then SHUT_WR) once everything read has been
// written; the relay finishes when both directions have. An error on either side ends it at
// once. When it finishes it destroys its transports (closing the fds), before the done callback
// runs.
//
// Ownership: the Relay owns its transports (and so the fds). Both directions, and the transports
// of socket sides, are members rather than separate allocations, so a relay between two sockets
// allocates nothing while idle and lives inside its owner. `*pool` and the reactor must outlive
// it.
// The done callback runs at most once; the Relay may be destroyed from inside it or at any other
// time. Loop-thread only.

#ifndef BROKERPROXY_PROXY_TRANSPORT_RELAY_H_
#define BROKERPROXY_PROXY_TRANSPORT_RELAY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loop/handle.h"
#include "loop/reactor.h"
#include "loop/status.h"
#include "proxy/transport/transport.h"

namespace brokerproxy::proxy {

// Idle pipes (and copy buffers) kept for reuse, so a busy proxy does not create and close a
// pipe, or allocate a buffer, per chunk.
class PipePool {
 public:
  // The size of a copy buffer.
  static constexpr size_t kBufferSize = 64 * 1024;

  struct Pipe {
    int read_fd = -1;
    int write_fd = -1;
    int capacity = 0;  // bytes the pipe holds (F_GETPIPE_SZ)
  };

  // The capacity of a small pipe (the kernel's default).
  static constexpr int kSmallPipe = 64 * 1024;
  // Default of `budget`: the kernel memory that large pipes in use may hold together.
  static constexpr size_t kDefaultBudget = size_t{64} << 20;

  // `pipe_size`: requested capacity (F_SETPIPE_SZ; the kernel may cap it, then the default
  // stays). `max_idle`: pipes kept when released. A pipe is large only while the large pipes in
  // use stay within `budget` bytes together; past it pipes get kSmallPipe. So slow readers,
  // each keeping a pipe full, pin at most `budget` plus kSmallPipe apiece of kernel memory.
  PipePool(int pipe_size, size_t max_idle, size_t budget = kDefaultBudget);
  ~PipePool();
  PipePool(const PipePool&) = delete;
  PipePool& operator=(const PipePool&) = delete;

  Result<Pipe> Acquire();
  // An empty pipe goes back to the pool (or is closed if the pool is full); a pipe that still
  // holds bytes is closed, since they belong to a session that is gone.
  void Release(Pipe pipe, bool empty);

  std::unique_ptr<char[]> AcquireBuffer();
  void ReleaseBuffer(std::unique_ptr<char[]> buffer);

  size_t idle() const { return idle_.size(); }
  size_t in_use() const { return in_use_; }
  // Capacity of the pipes in use, together.
  size_t in_use_bytes() const { return in_use_bytes_; }

 private:
  int pipe_size_;
  size_t max_idle_;
  size_t budget_;
  size_t in_use_ = 0;
  size_t in_use_bytes_ = 0;
  size_t large_in_use_bytes_ = 0;  // of the pipes larger than kSmallPipe
  std::vector<Pipe> idle_;
  std::vector<std::unique_ptr<char[]>> buffers_;
};

class Relay {
 public:
  // One side of the relay: where its bytes are read and where bytes for it are written. For a
  // socket both are the same fd; for stdio they are stdin and stdout.
  struct Side {
    Side() = default;
    // A socket.
    explicit Side(loop::IoHandle socket) : in(std::move(socket)) {}
    // Separate fds for reading and writing (stdio), not sockets.
    Side(loop::IoHandle read, loop::IoHandle write)
        : in(std::move(read)), out(std::move(write)), sockets(false) {}

    loop::IoHandle in;
    loop::IoHandle out;   // empty: same as `in`
    bool sockets = true;  // false: pipes or a tty (copy, and close rather than shut down)
  };
  // OK when both directions finished; otherwise the error that ended the relay, and which
  // side it came from ("client", "backend", ...).
  using DoneCallback = std::function<void(Status status)>;

  // Bytes moved so far, per direction.
  struct Counters {
    uint64_t a_to_b = 0;
    uint64_t b_to_a = 0;
  };

  // `a_name`/`b_name` label errors ("client", "backend"). `prefix_to_a` is written to side a
  // before anything from b (e.g. the proxy's "OK\n"); `prefix_to_b` likewise (e.g. a buffered
  // TLS ClientHello).
  Relay(PipePool* pool, Side a, Side b, const char* a_name, const char* b_name,
        std::string prefix_to_a, std::string prefix_to_b, DoneCallback done);
  // The same between any two transports.
  Relay(PipePool* pool, std::unique_ptr<Transport> a, std::unique_ptr<Transport> b,
        const char* a_name, const char* b_name, std::string prefix_to_a, std::string prefix_to_b,
        DoneCallback done);
  ~Relay();
  Relay(const Relay&) = delete;
  Relay& operator=(const Relay&) = delete;

  // Starts moving bytes. What the transports are already known to be ready for moves on a later
  // loop turn, and the done callback never runs inside this call; or, with `now`, within this
  // call, which may then end the relay (REQUIRES: the caller touches nothing of it afterwards).
  void Start(bool now = false);
  // Ends now without the done callback: the transports are closed, the counters stay.
  void Stop();

  Counters counters() const { return {a_to_b_.moved, b_to_a_.moved}; }
  // True once one direction has finished (a half-closed session).
  bool half_closed() const;
  // Milliseconds (loop time) of the last byte moved.
  uint64_t last_activity_ms() const { return last_activity_ms_; }
  // Times a direction stopped reading because its sink was full (the backpressure at work).
  uint64_t pauses() const { return a_to_b_.pauses + b_to_a_.pauses; }
  // Bytes held in the relay's pipes and buffers right now.
  size_t buffered() const;

 private:
  // One direction: reads its source and writes what it read to the other direction's source
  // (the sink). Embedded in the Relay; relay.cc has the rules.
  struct Pump {
    Transport* src = nullptr;
    EdgeSocket* src_sock = nullptr;  // this and the other's set: may splice through a pipe
    const char* src_name = "";
    const Pump* other = nullptr;          // the opposite direction
    uint64_t moved = 0;                   // payload bytes written to the sink
    uint64_t pauses = 0;                  // times it stopped reading because the sink was full
    std::unique_ptr<std::string> prefix;  // written to the sink before anything else
    std::unique_ptr<char[]> buf;
    PipePool::Pipe pipe;
    uint32_t prefix_off = 0;
    uint32_t in_pipe = 0;
    uint32_t buf_len = 0;
    uint32_t buf_off = 0;
    bool splice_mode = true;  // both sockets: may splice through a pipe; else read/write only
    bool bulk = false;        // splicing now (the last read filled the buffer)
    bool has_pipe = false;
    bool src_eof = false;
    bool done = false;
    bool blocked = false;  // waiting for the sink with bytes held (counted in pauses)

    Transport* dst() const { return other->src; }
    EdgeSocket* dst_sock() const { return other->src_sock; }
    bool holding() const;
    size_t held() const;
    Status SrcError(const IoResult& r) const;
    Status DstError(const IoResult& r) const;
    void ReleaseHeld(PipePool* pool);
    Status Drain();
    Status Fill(PipePool* pool);
    Status Step(PipePool* pool);
    Status Wait();
  };

  // Sets up the two directions between `a` and `b`.
  void Connect(Transport* a, Transport* b, const char* a_name, const char* b_name,
               std::string prefix_to_a, std::string prefix_to_b);
  void OnEvent(loop::IoWatch* watch);
  // Runs a pump and handles its outcome; false if the relay ended.
  bool Run(Pump* p);
  void Finish(Status status);

  PipePool* pool_;
  // The sides' transports: sockets (and stdio pairs) held in place, any other kind owned.
  // Closed once finished.
  SocketTransport socket_a_;
  SocketTransport socket_b_;
  std::unique_ptr<Transport> owned_a_;
  std::unique_ptr<Transport> owned_b_;
  Pump a_to_b_;
  Pump b_to_a_;
  DoneCallback done_;
  uint64_t last_activity_ms_ = 0;
  bool finished_ = false;
};

// The transport of a side: a socket, or a stdio pair.
std::unique_ptr<Transport> SideTransport(Relay::Side side);

// Shared socket helpers for the proxy and the client.
// TCP_NODELAY and keepalive (first probe after `keepalive_s` idle seconds; 0 = off) on a TCP
// socket.
void TuneTcpSocket(int fd, int keepalive_s);
// Best-effort write of a short reply on a non-blocking socket, for answers sent just before
// closing; returns bytes written. `flags` are added to send(2)'s (MSG_MORE, say).
size_t SendBestEffort(int fd, std::string_view data, int flags = 0);
// Half-closes, discards what the peer already sent (so close() sends FIN, not RST, and the
// peer can read the last reply), then closes.
void CloseGracefully(int fd);
// The pending error of a socket (SO_ERROR), as an errno value.
int SocketError(int fd);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TRANSPORT_RELAY_H_
