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
constexpr unsigned kSpliceFlags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;

bool WouldBlock(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

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

struct Relay::Pump {
  loop::IoWatch* src = nullptr;
  loop::IoWatch* dst = nullptr;
  const char* src_name = "";
  const char* dst_name = "";
  bool splice_mode = true;  // both sockets: may splice through a pipe; else read/write only
  bool bulk = false;        // splicing now (the last read filled the buffer)
  bool src_socket = true;
  bool dst_is_socket = true;
  std::string prefix;  // written to dst before anything else
  size_t prefix_off = 0;
  PipePool::Pipe pipe;
  bool has_pipe = false;
  size_t in_pipe = 0;
  std::unique_ptr<char[]> buf;
  size_t buf_len = 0;
  size_t buf_off = 0;
  bool src_eof = false;
  bool done = false;
  const Pump* other = nullptr;  // the opposite direction
  uint64_t* moved = nullptr;

  bool holding() const { return prefix_off < prefix.size() || in_pipe > 0 || buf_off < buf_len; }

  Status SrcError(int err) const {
    return PosixError(std::string("reading from ") + src_name, err);
  }
  Status DstError(int err) const { return PosixError(std::string("writing to ") + dst_name, err); }

  void ReleaseHeld(PipePool* pool) {
    if (has_pipe) {
      pool->Release(pipe, in_pipe == 0);
      has_pipe = false;
      in_pipe = 0;
    }
    if (buf) pool->ReleaseBuffer(std::move(buf));
    buf_len = buf_off = 0;
  }

  // Writes what is held to dst, in order: the prefix, then the pipe or the buffer, until all
  // is written or dst is full (then its writable flag is cleared).
  Status Drain() {
    for (;;) {
      ssize_t n;
      if (prefix_off < prefix.size()) {
        // send() rather than write(): a vanished peer must not raise SIGPIPE.
        n = dst_is_socket
                ? ::send(dst->fd(), prefix.data() + prefix_off, prefix.size() - prefix_off,
                         MSG_NOSIGNAL)
                : ::write(dst->fd(), prefix.data() + prefix_off, prefix.size() - prefix_off);
      } else if (in_pipe > 0) {
        n = ::splice(pipe.read_fd, nullptr, dst->fd(), nullptr, in_pipe, kSpliceFlags);
      } else if (buf_off < buf_len) {
        n = ::write(dst->fd(), buf.get() + buf_off, buf_len - buf_off);
      } else {
        break;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (WouldBlock(errno)) {
          dst->ClearWritable();
          return Status::OK();
        }
        return DstError(errno);
      }
      if (prefix_off < prefix.size()) {
        prefix_off += n;
        continue;  // the prefix is protocol, not payload: not counted
      }
      if (in_pipe > 0) {
        in_pipe -= n;
      } else {
        buf_off += n;
      }
      *moved += n;
    }
    if (!prefix.empty()) {
      std::string().swap(prefix);
      prefix_off = 0;
    }
    return Status::OK();
  }

  // Reads one chunk from src into the pipe or the buffer, or learns that src is empty (then its
  // readable flag is cleared) or at its end.
  //
  // Between two sockets the first chunk is read into the buffer: small, interactive traffic
  // (a shell, a request) then costs a read and a write, and a read that returns less than the
  // buffer holds proves the socket empty, so no read ending in EAGAIN is needed. Only a read
  // that fills the buffer switches the direction to splice(2), where bulk data stays in the
  // kernel; a small splice switches it back. (A short splice proves nothing: a pipe fills up
  // by buffers, not bytes, so small segments can fill it early.)
  Status Fill(PipePool* pool) {
    for (;;) {
      ssize_t n;
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
        n = ::splice(src->fd(), nullptr, pipe.write_fd, nullptr, pipe.capacity, kSpliceFlags);
        if (n < 0 && errno == EINVAL) {  // this pair of fds cannot splice: copy instead
          ReleaseHeld(pool);
          splice_mode = false;
          continue;
        }
      } else {
        if (!buf) buf = pool->AcquireBuffer();
        n = ::read(src->fd(), buf.get(), PipePool::kBufferSize);
      }
      if (n > 0) {
        if (spliced) {
          in_pipe = n;
          if (static_cast<size_t>(n) < PipePool::kBufferSize / 4) bulk = false;
        } else {
          buf_len = n;
          buf_off = 0;
          if (static_cast<size_t>(n) == PipePool::kBufferSize) {
            bulk = splice_mode;
          } else if (src_socket && !src->hangup()) {
            // A socket read returns all that is queued, up to the size asked for: anything
            // newer brings a new edge. (Not a tty: it returns one line at a time. Not after a
            // hangup: the end of the stream must still be read.)
            src->ClearReadable();
          }
        }
        return Status::OK();
      }
      if (n == 0) {
        src_eof = true;
        return Status::OK();
      }
      if (errno == EINTR) continue;
      if (WouldBlock(errno)) {
        src->ClearReadable();
        return Status::OK();
      }
      return SrcError(errno);
    }
  }

  // Moves as much as the peers allow, up to the per-event budget.
  Status Step(PipePool* pool) {
    if (done) return Status::OK();
    for (int round = 0; round < kRoundsPerEvent; ++round) {
      if (holding()) {
        if (!dst->writable()) return Status::OK();  // an EPOLLOUT edge brings us back
        BP_RETURN_IF_ERROR(Drain());
        if (holding()) return Status::OK();
      }
      ReleaseHeld(pool);  // nothing held: an idle direction keeps no pipe and no buffer
      if (src_eof) {
        // Pass the EOF on, unless the other way is over too: then the relay ends and closes
        // both sockets, which sends the FIN (both were read to EOF, so no RST).
        if (dst_is_socket && !other->done) ::shutdown(dst->fd(), SHUT_WR);
        done = true;
        return Status::OK();
      }
      if (!src->readable()) return Status::OK();  // an EPOLLIN edge brings us back
      Status s = Fill(pool);
      if (!s.ok() || (!holding() && !src_eof)) {
        ReleaseHeld(pool);
        return s;
      }
    }
    // Budget used up with work left: no new edge will announce it, so ask to come back.
    if (holding() ? dst->writable() : src->readable()) (holding() ? dst : src)->Yield();
    return Status::OK();
  }
};

// ---- Relay ----

Relay::Relay(PipePool* pool, Side a, Side b, const char* a_name, const char* b_name,
             std::string prefix_to_a, std::string prefix_to_b, DoneCallback done)
    : pool_(pool), done_(std::move(done)) {
  loop::IoWatch* a_in = a.in.get();
  loop::IoWatch* a_out = a.out ? a.out.get() : a_in;
  loop::IoWatch* b_in = b.in.get();
  loop::IoWatch* b_out = b.out ? b.out.get() : b_in;
  loop_ = &a_in->reactor().loop();
  auto make = [&](loop::IoWatch* src, loop::IoWatch* dst, const Side& from, const Side& to,
                  const char* sn, const char* dn, std::string prefix, uint64_t* moved) {
    auto p = std::make_unique<Pump>();
    p->src = src;
    p->dst = dst;
    p->src_name = sn;
    p->dst_name = dn;
    p->src_socket = from.sockets;
    p->dst_is_socket = to.sockets;
    p->splice_mode = from.sockets && to.sockets;
    p->prefix = std::move(prefix);
    p->moved = moved;
    return p;
  };
  a_to_b_ = make(a_in, b_out, a, b, a_name, b_name, std::move(prefix_to_b), &counters_.a_to_b);
  b_to_a_ = make(b_in, a_out, b, a, b_name, a_name, std::move(prefix_to_a), &counters_.b_to_a);
  a_to_b_->other = b_to_a_.get();
  b_to_a_->other = a_to_b_.get();
  for (Side* side : {&a, &b}) {
    fds_.push_back(std::move(side->in));
    if (side->out) fds_.push_back(std::move(side->out));
  }
}

Relay::~Relay() {
  // Pipes still holding bytes are closed, not pooled.
  if (a_to_b_) a_to_b_->ReleaseHeld(pool_);
  if (b_to_a_) b_to_a_->ReleaseHeld(pool_);
}

void Relay::Start() {
  last_activity_ms_ = loop_->Now();
  for (loop::IoHandle& io : fds_) {
    io->SetCallback([this](loop::IoWatch* w) { OnEvent(w); });
  }
  // What the fds are already known to be ready for (a previous owner saw the edges) moves on
  // the next turn; otherwise the next edge starts things.
  for (Pump* p : {a_to_b_.get(), b_to_a_.get()}) {
    if (p->holding() ? p->dst->writable() : p->src->readable()) {
      fds_.front()->Yield();
      break;
    }
  }
}

bool Relay::half_closed() const { return a_to_b_->done || b_to_a_->done; }

void Relay::OnEvent(loop::IoWatch*) {
  if (finished_) return;
  uint64_t before = counters_.a_to_b + counters_.b_to_a;
  // Both directions: the event may be readiness for one's source or the other's sink, and a
  // pump that cannot move returns after two flag checks.
  for (Pump* p : {a_to_b_.get(), b_to_a_.get()}) {
    if (!Run(p)) return;  // finished: `this` may be gone
  }
  if (counters_.a_to_b + counters_.b_to_a != before) last_activity_ms_ = loop_->Now();
}

bool Relay::Run(Pump* p) {
  bool was_done = p->done;
  Status s = p->Step(pool_);
  if (!s.ok()) {
    Finish(s);
    return false;
  }
  if (p->done && !was_done && !p->dst_is_socket) {
    // A pipe (stdout) has no half-close: closing it is how its reader sees the end.
    for (loop::IoHandle& io : fds_) {
      if (io.get() == p->dst) io.reset();
    }
  }
  if (a_to_b_->done && b_to_a_->done) {
    Finish(Status::OK());
    return false;
  }
  return true;
}

void Relay::Finish(Status status) {
  if (finished_) return;
  finished_ = true;
  // Over: the sockets close now, whatever the owner does with this object.
  for (loop::IoHandle& io : fds_) io.reset();
  DoneCallback done = std::move(done_);
  if (done) done(std::move(status));  // may destroy this
}

// ---- conversions between reactor fds and libuv polls ----

Result<loop::HandlePtr<loop::Poll>> ToPoll(loop::Loop& loop, loop::IoHandle io) {
  if (!io) return loop::HandlePtr<loop::Poll>();
  int fd = io.Release();
  return loop::Poll::Create(loop, fd, loop::FdOwnership::kOwned);
}

Result<PollSide> ToPolls(loop::Loop& loop, Relay::Side side) {
  PollSide out;
  auto in = ToPoll(loop, std::move(side.in));
  if (!in.ok()) return in.status();
  out.in = std::move(in).value();
  auto o = ToPoll(loop, std::move(side.out));
  if (!o.ok()) return o.status();
  out.out = std::move(o).value();
  return out;
}

Result<loop::IoHandle> ToIo(loop::Reactor& reactor, loop::HandlePtr<loop::Poll> poll) {
  int fd = poll->ReleaseFd();
  poll.reset();  // leaves libuv's epoll set before joining ours
  return reactor.Add(fd, nullptr);
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

size_t SendBestEffort(int fd, std::string_view data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
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
