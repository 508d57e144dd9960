// Reactor: an edge-triggered epoll set for the sockets whose bytes brokerproxy moves itself,
// nested in the libuv loop through one uv_poll on the epoll fd.
//
// Why not one uv_poll per socket: uv_poll is level-triggered, so a relay must change its
// interest whenever a pipe fills or drains, and in libuv 1.44 every such change costs two
// epoll_ctl calls (ADD fails with EEXIST, then MOD) and stopping a poll a third (DEL). Measured
// on the handshake benchmark: 24 epoll_ctl per proxied connection. Here a socket is registered
// once, for everything (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET), and stays registered until
// it is closed; readiness is kept in user space instead: an edge sets `readable`/`writable`,
// and the consumer clears it when a read or write returns EAGAIN. A proxied connection then
// costs two epoll_ctl calls in all, and none per chunk.
//
// The edge-triggered contract for consumers: after a callback, keep reading (or writing) until
// EAGAIN, or remember that the fd is still ready (the flags do that) and come back without a
// new edge: call Yield() to be called again on a later loop turn.
//
// Stale events: epoll keys an entry by the open file, not the descriptor, and close() removes
// it only when the last descriptor of that file goes (a dup, a fork, SCM_RIGHTS or a library
// that dups keeps it alive). So an event may arrive for a watch whose handle is long gone. An
// event never carries a pointer: it carries a slot index and that slot's generation
// (`epoll_event.data.u64`), and freeing a watch bumps its slot's generation, so a stale event
// finds another generation and is dropped; a reused slot cannot be mistaken for the old one
// (until 2^32 reuses of one slot while a stale entry lives). This costs no syscall; calling
// EPOLL_CTL_DEL on every close would cost one per socket (two per proxied connection) and
// still leaves the entry if a dup of the fd was made behind the reactor's back. Sharing::kShared
// still asks for the DEL, only so that a descriptor known to be shared (stdin) stops waking the
// loop after its handle is gone.
//
// A dispatch budget: the callbacks due (new edges and Yield()s) wait in one FIFO line, and one
// dispatch, or one later turn, runs at most kDispatchBudget of them, and only those in line
// when it began (a Yield() waits for the next turn); the rest keep their readiness flags and
// their place and run on the next loop turn, after timers and the other handles had theirs (a
// loop iteration may hold a turn and a dispatch: two budgets). A watch is in line at most
// once, so no watch is served twice while another waits.
//
// The reactor keeps Loop::Run() from returning only while it has registered fds, like any
// active handle.
//
// One wait per turn: under Loop::Run() the reactor's epoll fd sits in libuv's epoll set, so a
// turn that moves bytes costs two epoll_wait calls (libuv's, which reports the reactor's fd,
// then the reactor's own), and the kernel polls each ready socket twice. A process whose work
// is mostly here (the daemon, `connect`) runs the loop with Reactor::Run() instead, which swaps
// the nesting: libuv's epoll fd joins the reactor's set, the reactor blocks (for as long as
// libuv's next timer allows), and libuv runs one non-blocking iteration only when its own fd is
// ready, a timer is due, or it has work queued. Deferred work runs after each dispatch. A libuv
// watcher started from a callback enters libuv's epoll set only in libuv's next iteration;
// until then uv_backend_timeout() is 0, so the reactor never blocks on a set that lacks it.
//
// Ownership: an IoHandle owns one registered fd (and closes it); the Reactor owns the IoWatch
// records, which it frees only after the dispatch that may still reference them, so a callback
// may drop any IoHandle, its own included. The Reactor must outlive every IoHandle. Loop-thread
// only.

#ifndef BROKERPROXY_LOOP_REACTOR_H_
#define BROKERPROXY_LOOP_REACTOR_H_

#include <sys/epoll.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#include "loop/handle.h"
#include "loop/lifetime.h"
#include "loop/loop.h"
#include "loop/poll.h"

namespace brokerproxy::loop {

class Reactor;

// A registered fd and what is known of its readiness.
class IoWatch {
 public:
  using Callback = std::function<void(IoWatch* watch)>;

  int fd() const { return fd_; }
  Reactor& reactor() const { return *reactor_; }
  // An edge said a read (or write) would not block, and no EAGAIN has been seen since. A hangup
  // or an error counts as readable and writable: the next call reports it.
  bool readable() const { return readable_; }
  bool writable() const { return writable_; }
  void ClearReadable() { readable_ = false; }
  void ClearWritable() { writable_ = false; }
  // Known another way, ahead of its edge (a connect() that completed at once): set as the edge
  // would set it. The edge still comes, and finds the flag set.
  void SetWritable() { writable_ = true; }
  // The peer shut down its side (EPOLLRDHUP) or the socket failed (EPOLLERR/EPOLLHUP).
  bool hangup() const { return hangup_; }

  // Replaces the callback, or clears it with nullptr (also from inside it: that sticks).
  void SetCallback(Callback cb) {
    cb_ = std::move(cb);
    replaced_ = true;
  }
  // Calls the callback again on a later loop turn, without a new edge.
  void Yield();

 private:
  friend class Reactor;
  friend class IoHandle;
  IoWatch(Reactor* reactor, int fd) : reactor_(reactor), fd_(fd) {}

  Reactor* reactor_;
  int fd_;
  uint32_t slot_ = 0;  // in the reactor's slot table, named by this watch's events
  bool readable_ = false;
  bool writable_ = false;
  bool hangup_ = false;
  bool dead_ = false;
  bool queued_ = false;    // in the reactor's line of callbacks due
  bool shared_ = false;    // other descriptors refer to the open file: leave epoll explicitly
  bool replaced_ = false;  // SetCallback() ran during the callback running now
  // 56 bytes in all, a 64-byte heap chunk, two per idle plain session: new flags belong in the
  // padding beside the ones above.
  Callback cb_;
};

// Unique owner of a registered fd. Destroying it closes the fd (after which no event reaches the
// watch, even if a dup of the fd keeps the epoll entry); Release() instead unregisters it and
// hands the still-open fd back.
class IoHandle {
 public:
  IoHandle() = default;
  explicit IoHandle(IoWatch* watch) : watch_(watch) {}
  IoHandle(IoHandle&& other) noexcept : watch_(other.watch_) { other.watch_ = nullptr; }
  IoHandle& operator=(IoHandle&& other) noexcept;
  IoHandle(const IoHandle&) = delete;
  IoHandle& operator=(const IoHandle&) = delete;
  ~IoHandle() { reset(); }

  explicit operator bool() const { return watch_ != nullptr; }
  IoWatch* get() const { return watch_; }
  IoWatch* operator->() const { return watch_; }
  int fd() const { return watch_ ? watch_->fd() : -1; }

  // Closes the fd now.
  void reset();
  // Unregisters the fd and returns it, open, to the caller (e.g. to hand it to libssh).
  int Release();

 private:
  IoWatch* watch_ = nullptr;
};

class Reactor {
 public:
  static Result<std::unique_ptr<Reactor>> Create(Loop& loop);
  // REQUIRES: no IoHandle of this reactor is alive.
  ~Reactor();
  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  // Callbacks run by one dispatch (or one later turn) at most; see the top of this file.
  static constexpr int kDispatchBudget = 64;

  // Whether other descriptors are known to refer to an fd's open file, as for a dup of stdin.
  // Closing a shared one leaves the epoll set explicitly (one more syscall), so that its
  // entry stops waking the loop; safety does not depend on it (see the top of this file).
  enum class Sharing { kPrivate, kShared };
  // Registers `fd` (non-blocking; ownership passes to the handle, also on failure, when the fd
  // is closed). An fd that is already readable or writable gets its first callback at once
  // (on a later loop turn).
  Result<IoHandle> Add(int fd, IoWatch::Callback cb, Sharing sharing = Sharing::kPrivate);

  // Runs the loop as Loop::Run() does (until Loop::Stop(), or until neither libuv nor the
  // reactor has anything left), with one blocking wait per turn (see the top of this file).
  // Loop::Run() works as before once it returns. Not from inside a callback of this loop;
  // the reactor must outlive the call.
  void Run();

  Loop& loop() const { return *loop_; }
  size_t size() const { return live_; }

 private:
  friend class IoWatch;
  friend class IoHandle;
  explicit Reactor(Loop* loop) : loop_(loop) {}
  // Slot index and generation of an epoll event (see the top of this file).
  struct Slot {
    IoWatch* watch = nullptr;
    uint32_t generation = 0;
  };
  static uint64_t Token(uint32_t slot, uint32_t generation) {
    return (static_cast<uint64_t>(generation) << 32) | slot;
  }
  // Loop::Run()'s way in: libuv watches the epoll fd and calls Dispatch() when it is readable.
  void Nest();
  // Collects the events pending now and runs the callbacks due.
  void Dispatch();
  // Marks and lines up the watches that `events` name; reports whether one was libuv's fd.
  bool Collect(const epoll_event* events, int n);
  // Whether libuv has work for a non-blocking iteration now (time updated first).
  bool LoopDue() const;
  // Puts `w` at the end of the line of callbacks due, unless it is in it already.
  void Enqueue(IoWatch* w);
  // Runs up to kDispatchBudget callbacks from the head of the line; schedules a later turn
  // for the rest.
  void RunDue();
  void ScheduleTurn();
  // Runs w's callback from a local (it may replace or clear itself, or drop its handle) and
  // keeps it unless it was replaced meanwhile.
  static void RunCallback(IoWatch* w);
  void Retire(IoWatch* w, bool close_fd);
  void Reap();

  Loop* loop_;
  int epfd_ = -1;
  HandlePtr<Poll> poll_;
  size_t live_ = 0;
  bool dispatching_ = false;
  bool reap_scheduled_ = false;
  bool turn_scheduled_ = false;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_slots_;
  std::deque<IoWatch*> due_;  // FIFO; dead watches in it are skipped (and freed after)
  std::vector<IoWatch*> dead_;
  Lifetime lifetime_;  // last: guards the deferred turn and reap
};

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_REACTOR_H_
