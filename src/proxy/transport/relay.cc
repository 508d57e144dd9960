#include "proxy/transport/relay.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>

namespace brokerproxy::proxy {
namespace {

// Chunks moved per event before yielding to other sessions; what is left is picked up on a
// later loop turn (IoWatch::Yield: edge-triggered readiness does not repeat itself).
constexpr int kRoundsPerEvent = 8;

// The transport of a socket side, or of a stdio pair.
SocketTransport SocketOf(Relay::Side side) {
  if (side.out) return SocketTransport(std::move(side.in), std::move(side.out));
  return SocketTransport(std::move(side.in));
}

}  // namespace

// ---- PipePool ----

PipePool::PipePool(int pipe_size, size_t max_idle, size_t budget)
    : pipe_size_(pipe_size), max_idle_(max_idle), budget_(budget) {}

PipePool::~PipePool() {
  for (const Pipe& p : idle_) {
    ::close(p.read_fd);
    ::close(p.write_fd);
  }
}

Result<PipePool::Pipe> PipePool::Acquire() {
  Pipe p;
  if (!idle_.empty()) {
    p = idle_.back();
    idle_.pop_back();
  } else {
    int fds[2];
    if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) return PosixError("pipe2", errno);
    p = Pipe{fds[0], fds[1], 0};
  }
  // A larger pipe means fewer syscalls per byte, but a slow reader keeps it full: large only
  // within the budget. The kernel may refuse a size (pipe-max-size, or the per-user pipe
  // quota), and the pipe then keeps what it has.
  int want = kSmallPipe;
  if (pipe_size_ > kSmallPipe && large_in_use_bytes_ + static_cast<size_t>(pipe_size_) <= budget_) {
    want = pipe_size_;
  }
  if (p.capacity != want) {
    (void)::fcntl(p.write_fd, F_SETPIPE_SZ, want);
    p.capacity = ::fcntl(p.write_fd, F_GETPIPE_SZ);
    if (p.capacity <= 0) p.capacity = kSmallPipe;
  }
  ++in_use_;
  in_use_bytes_ += static_cast<size_t>(p.capacity);
  if (p.capacity > kSmallPipe) large_in_use_bytes_ += static_cast<size_t>(p.capacity);
  return p;
}

std::unique_ptr<char[]> PipePool::AcquireBuffer() {
  if (buffers_.empty()) return std::unique_ptr<char[]>(new char[kBufferSize]);
  std::unique_ptr<char[]> b = std::move(buffers_.back());
  buffers_.pop_back();
  return b;
}

void PipePool::ReleaseBuffer(std::unique_ptr<char[]> buffer) {
  if (buffers_.size() < max_idle_) buffers_.push_back(std::move(buffer));
}

void PipePool::Release(Pipe p, bool empty) {
  assert(in_use_ > 0);
  --in_use_;
  in_use_bytes_ -= static_cast<size_t>(p.capacity);
  if (p.capacity > kSmallPipe) large_in_use_bytes_ -= static_cast<size_t>(p.capacity);
  if (empty && idle_.size() < max_idle_) {
    idle_.push_back(p);
    return;
  }
  ::close(p.read_fd);
  ::close(p.write_fd);
}

// ---- Pump: one direction ----

bool Relay::Pump::holding() const {
  return (prefix && prefix_off < prefix->size()) || in_pipe > 0 || buf_off < buf_len;
}

size_t Relay::Pump::held() const {
  return (prefix ? prefix->size() - prefix_off : 0) + in_pipe + (buf_len - buf_off);
}

Status Relay::Pump::SrcError(const IoResult& r) const {
  if (!r.error.ok()) return r.error;
  return PosixError(std::string("reading from ") + src_name, r.err);
}

Status Relay::Pump::DstError(const IoResult& r) const {
  if (!r.error.ok()) return r.error;
  return PosixError(std::string("writing to ") + other->src_name, r.err);
}

void Relay::Pump::ReleaseHeld(PipePool* pool) {
  if (has_pipe) {
    pool->Release(pipe, in_pipe == 0);
    has_pipe = false;
    in_pipe = 0;
  }
  if (buf) pool->ReleaseBuffer(std::move(buf));
  buf_len = buf_off = 0;
}

// Writes what is held to the sink, in order: the prefix, then the pipe or the buffer, until all
// is written or the sink is full (then its writable flag is cleared).
Status Relay::Pump::Drain() {
  Transport* sink = dst();
  for (;;) {
    IoResult r;
    bool from_prefix = prefix && prefix_off < prefix->size();
    if (from_prefix) {
      r = sink->Write(prefix->data() + prefix_off, prefix->size() - prefix_off);
    } else if (in_pipe > 0) {
      ssize_t n = dst_sock()->SpliceOut(pipe.read_fd, in_pipe);
      r = n > 0                    ? IoResult::Bytes(n)
          : n == -EAGAIN || n == 0 ? IoResult::Again()
                                   : IoResult::Errno(-n);
    } else if (buf_off < buf_len) {
      r = sink->Write(buf.get() + buf_off, buf_len - buf_off);
    } else {
      break;
    }
    if (r.kind == IoResult::Kind::kAgain) return Status::OK();
    if (r.kind != IoResult::Kind::kBytes) {
      if (r.kind == IoResult::Kind::kEof) r = IoResult::Errno(EPIPE);
      return DstError(r);
    }
    auto n = static_cast<uint32_t>(r.n);
    if (from_prefix) {
      prefix_off += n;
      continue;  // the prefix is protocol, not payload: not counted
    }
    if (in_pipe > 0) {
      in_pipe -= n;
    } else {
      buf_off += n;
    }
    moved += n;
  }
  if (prefix) {
    prefix.reset();
    prefix_off = 0;
  }
  return Status::OK();
}

// Reads one chunk from src into the pipe or the buffer, or learns that src is empty (then its
// readable flag is cleared) or at its end.
//
// Between two sockets the first chunk is read into the buffer: small, interactive traffic
// (a shell, a request) then costs a read and a write, and a read that returns less than the
// buffer holds proves the socket empty, so no read ending in EAGAIN is needed (EdgeSocket).
// Only a read that fills the buffer switches the direction to splice(2), where bulk data
// stays in the kernel; a small splice switches it back. (A short splice proves nothing: a
// pipe fills up by buffers, not bytes, so small segments can fill it early.)
Status Relay::Pump::Fill(PipePool* pool) {
  for (;;) {
    IoResult r;
    bool spliced = splice_mode && bulk;
    if (spliced) {
      if (!has_pipe) {
        auto p = pool->Acquire();
        if (!p.ok()) {
          splice_mode = false;  // out of fds for pipes: copying still works
          continue;
        }
        pipe = *p;
        has_pipe = true;
      }
      ssize_t n = src_sock->SpliceIn(pipe.write_fd, pipe.capacity);
      if (n == -EINVAL) {  // this pair of fds cannot splice: copy instead
        ReleaseHeld(pool);
        splice_mode = false;
        continue;
      }
      r = n > 0          ? IoResult::Bytes(n)
          : n == 0       ? IoResult::Eof()
          : n == -EAGAIN ? IoResult::Again()
                         : IoResult::Errno(-n);
    } else {
      if (!buf) buf = pool->AcquireBuffer();
      r = src->Read(buf.get(), PipePool::kBufferSize);
    }
    switch (r.kind) {
      case IoResult::Kind::kBytes:
        if (spliced) {
          in_pipe = static_cast<uint32_t>(r.n);
          if (r.n < PipePool::kBufferSize / 4) bulk = false;
        } else {
          buf_len = static_cast<uint32_t>(r.n);
          buf_off = 0;
          if (r.n == PipePool::kBufferSize) bulk = splice_mode;
        }
        return Status::OK();
      case IoResult::Kind::kEof:
        src_eof = true;
        return Status::OK();
      case IoResult::Kind::kAgain:
        return Status::OK();
      case IoResult::Kind::kError:
        return SrcError(r);
    }
  }
}

// Moves as much as the peers allow, up to the per-event budget.
Status Relay::Pump::Step(PipePool* pool) {
  if (done) return Status::OK();
  Transport* sink = dst();
  for (int round = 0; round < kRoundsPerEvent; ++round) {
    if (holding()) {
      if (!sink->writable()) return Wait();  // a writable edge brings us back
      BP_RETURN_IF_ERROR(Drain());
      if (holding()) {
        if (sink->writable()) continue;  // a transport that took nothing yet may take more
        return Wait();
      }
    }
    blocked = false;
    ReleaseHeld(pool);  // nothing held: an idle direction keeps no pipe and no buffer
    if (src_eof) {
      // Pass the EOF on. `last`: the other way is over too, and the relay ends and closes
      // both transports next.
      IoResult r = sink->ShutdownWrite(other->done);
      if (r.kind == IoResult::Kind::kAgain) return Status::OK();  // sink writable: again
      if (r.kind == IoResult::Kind::kError) return DstError(r);
      done = true;
      return Status::OK();
    }
    if (!src->readable()) return Status::OK();  // a readable edge brings us back
    Status s = Fill(pool);
    if (!s.ok() || (!holding() && !src_eof)) {
      ReleaseHeld(pool);
      if (!s.ok() || !src->readable()) return s;
      // Nothing yet from a transport still readable (a TLS record not complete yet, a
      // protocol answer sent): try again within the budget.
    }
  }
  // Budget used up with work left: no new edge will announce it, so ask to come back.
  if (holding() ? sink->writable() : src->readable()) (holding() ? sink : src)->Yield();
  return Status::OK();
}

// Bytes held and the sink full: the source is not read until they are written.
Status Relay::Pump::Wait() {
  if (!blocked) {
    blocked = true;
    ++pauses;
  }
  return Status::OK();
}

// ---- Relay ----

std::unique_ptr<Transport> SideTransport(Relay::Side side) {
  return std::make_unique<SocketTransport>(SocketOf(std::move(side)));
}

Relay::Relay(PipePool* pool, Side a, Side b, const char* a_name, const char* b_name,
             std::string prefix_to_a, std::string prefix_to_b, DoneCallback done)
    : pool_(pool),
      socket_a_(SocketOf(std::move(a))),
      socket_b_(SocketOf(std::move(b))),
      done_(std::move(done)) {
  Connect(&socket_a_, &socket_b_, a_name, b_name, std::move(prefix_to_a), std::move(prefix_to_b));
}

Relay::Relay(PipePool* pool, std::unique_ptr<Transport> a, std::unique_ptr<Transport> b,
             const char* a_name, const char* b_name, std::string prefix_to_a,
             std::string prefix_to_b, DoneCallback done)
    : pool_(pool), owned_a_(std::move(a)), owned_b_(std::move(b)), done_(std::move(done)) {
  Connect(owned_a_.get(), owned_b_.get(), a_name, b_name, std::move(prefix_to_a),
          std::move(prefix_to_b));
}

void Relay::Connect(Transport* a, Transport* b, const char* a_name, const char* b_name,
                    std::string prefix_to_a, std::string prefix_to_b) {
  auto set = [](Pump* p, Transport* src, const char* name, std::string prefix, const Pump* other) {
    p->src = src;
    p->src_sock = src->splice_socket();
    p->src_name = name;
    p->other = other;
    if (!prefix.empty()) p->prefix = std::make_unique<std::string>(std::move(prefix));
  };
  set(&a_to_b_, a, a_name, std::move(prefix_to_b), &b_to_a_);
  set(&b_to_a_, b, b_name, std::move(prefix_to_a), &a_to_b_);
  a_to_b_.splice_mode = b_to_a_.splice_mode = a_to_b_.src_sock && b_to_a_.src_sock;
}

Relay::~Relay() {
  // Pipes still holding bytes are closed, not pooled.
  a_to_b_.ReleaseHeld(pool_);
  b_to_a_.ReleaseHeld(pool_);
}

void Relay::Start(bool now) {
  last_activity_ms_ = a_to_b_.src->loop().Now();
  auto cb = [this](loop::IoWatch* w) { OnEvent(w); };
  a_to_b_.src->SetCallback(cb);
  b_to_a_.src->SetCallback(cb);
  // What the transports are already known to be ready for (a previous owner saw the edges)
  // moves now or on the next turn; otherwise the next edge starts things.
  for (Pump* p : {&a_to_b_, &b_to_a_}) {
    if (p->holding() ? p->dst()->writable() : p->src->readable()) {
      if (now) {
        OnEvent(nullptr);  // may end the relay: the last thing done here
        return;
      }
      a_to_b_.src->Yield();
      break;
    }
  }
}

bool Relay::half_closed() const { return a_to_b_.done || b_to_a_.done; }

size_t Relay::buffered() const { return a_to_b_.held() + b_to_a_.held(); }

void Relay::OnEvent(loop::IoWatch*) {
  if (finished_) return;
  uint64_t before = a_to_b_.moved + b_to_a_.moved;
  // Both directions: the event may be readiness for one's source or the other's sink, and a
  // pump that cannot move returns after two flag checks.
  for (Pump* p : {&a_to_b_, &b_to_a_}) {
    if (!Run(p)) return;  // finished: `this` may be gone
  }
  if (a_to_b_.moved + b_to_a_.moved != before) last_activity_ms_ = a_to_b_.src->loop().Now();
}

bool Relay::Run(Pump* p) {
  Status s = p->Step(pool_);
  if (!s.ok()) {
    Finish(s);
    return false;
  }
  if (a_to_b_.done && b_to_a_.done) {
    Finish(Status::OK());
    return false;
  }
  return true;
}

void Relay::Stop() {
  done_ = nullptr;
  Finish(Status::OK());
}

void Relay::Finish(Status status) {
  if (finished_) return;
  finished_ = true;
  // Over: the sockets close now, whatever the owner does with this object. The pumps point at
  // the transports: they stop first.
  a_to_b_.done = b_to_a_.done = true;
  socket_a_.Close();
  socket_b_.Close();
  owned_a_.reset();
  owned_b_.reset();
  DoneCallback done = std::move(done_);
  if (done) done(std::move(status));  // may destroy this
}

// ---- socket helpers ----

void TuneTcpSocket(int fd, int keepalive_s) {
  int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (keepalive_s > 0) {
    // The first probe after `keepalive_s` idle seconds; their interval and number stay the
    // kernel's (net.ipv4.tcp_keepalive_intvl and _probes), as an administrator tuned them.
    (void)::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    (void)::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &keepalive_s, sizeof(keepalive_s));
  }
}

size_t SendBestEffort(int fd, std::string_view data, int flags) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n =
        ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT | flags);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    off += n;
  }
  return off;
}

void CloseGracefully(int fd) {
  ::shutdown(fd, SHUT_WR);
  char sink[4096];
  for (int i = 0; i < 16; ++i) {
    ssize_t n = ::recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
    if (n <= 0) break;
  }
  ::close(fd);
}

int SocketError(int fd) {
  int err = 0;
  socklen_t len = sizeof(err);
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
  return err;
}

}  // namespace brokerproxy::proxy
