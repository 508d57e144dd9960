#include "loop/reactor.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>

namespace brokerproxy::loop {
namespace {

// Events taken from the epoll set per dispatch. More pending keep the epoll fd readable, so
// the next loop turn dispatches again.
constexpr int kBatch = 256;

// The token of libuv's epoll fd in the reactor's set under Reactor::Run(): no slot's.
constexpr uint64_t kLoopToken = ~uint64_t{0};

}  // namespace

void IoWatch::Yield() {
  if (dead_) return;
  reactor_->Enqueue(this);
  reactor_->ScheduleTurn();
}

IoHandle& IoHandle::operator=(IoHandle&& other) noexcept {
  if (this != &other) {
    reset();
    watch_ = other.watch_;
    other.watch_ = nullptr;
  }
  return *this;
}

void IoHandle::reset() {
  if (!watch_) return;
  IoWatch* w = watch_;
  watch_ = nullptr;
  w->reactor_->Retire(w, /*close_fd=*/true);
}

int IoHandle::Release() {
  if (!watch_) return -1;
  IoWatch* w = watch_;
  watch_ = nullptr;
  int fd = w->fd_;
  w->reactor_->Retire(w, /*close_fd=*/false);
  return fd;
}

Result<std::unique_ptr<Reactor>> Reactor::Create(Loop& loop) {
  std::unique_ptr<Reactor> r(new Reactor(&loop));
  r->epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (r->epfd_ < 0) return PosixError("epoll_create1", errno);
  auto poll = Poll::Create(loop, r->epfd_, FdOwnership::kOwned);
  if (!poll.ok()) return poll.status();  // the Poll closed the epoll fd
  r->poll_ = std::move(poll).value();
  r->Nest();
  // Like any handle, the reactor keeps Loop::Run() going only while it watches something.
  r->poll_->Unref();
  return r;
}

Reactor::~Reactor() {
  lifetime_.End();
  poll_.reset();  // closes the epoll fd
  for (IoWatch* w : dead_) delete w;
}

Result<IoHandle> Reactor::Add(int fd, IoWatch::Callback cb, Sharing sharing) {
  uint32_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
  } else {
    slot = static_cast<uint32_t>(slots_.size());
  }
  auto* w = new IoWatch(this, fd);
  w->cb_ = std::move(cb);
  w->shared_ = sharing == Sharing::kShared;
  w->slot_ = slot;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.u64 = Token(slot, slot < slots_.size() ? slots_[slot].generation : 0);
  if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
    Status s = PosixError("epoll_ctl", errno);
    ::close(fd);
    delete w;
    return s;
  }
  if (slot < slots_.size()) {
    free_slots_.pop_back();
  } else {
    slots_.emplace_back();
  }
  slots_[slot].watch = w;
  if (live_++ == 0) poll_->Ref();
  return IoHandle(w);
}

void Reactor::Nest() {
  // The epoll fd is readable while any socket in the set has an event pending.
  poll_->Start(UV_READABLE, [this](int, int) { Dispatch(); });
}

void Reactor::Dispatch() {
  epoll_event events[kBatch];
  Collect(events, ::epoll_wait(epfd_, events, kBatch, 0));
  RunDue();
}

bool Reactor::Collect(const epoll_event* events, int n) {
  bool loop_ready = false;
  for (int i = 0; i < n; ++i) {
    uint64_t token = events[i].data.u64;
    if (token == kLoopToken) {
      loop_ready = true;
      continue;
    }
    auto slot = static_cast<uint32_t>(token);
    // A stale event: its watch was freed (the entry outlived it through a dup of the fd), or
    // closed earlier in this dispatch.
    if (slot >= slots_.size() || Token(slot, slots_[slot].generation) != token) continue;
    IoWatch* w = slots_[slot].watch;
    if (w == nullptr || w->dead_) continue;
    uint32_t e = events[i].events;
    if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) w->readable_ = true;
    if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) w->writable_ = true;
    if (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) w->hangup_ = true;
    Enqueue(w);
  }
  return loop_ready;
}

bool Reactor::LoopDue() const {
  uv_loop_t* uv = loop_->get();
  // With no active handle libuv's timeout is 0, yet a non-blocking run would do nothing.
  if (!uv_loop_alive(uv)) return false;
  uv_update_time(uv);
  return uv_backend_timeout(uv) == 0;
}

void Reactor::Run() {
  uv_loop_t* uv = loop_->get();
  const int uvfd = uv_backend_fd(uv);
  // Swap the nesting: the reactor's fd leaves libuv's set (an epoll set may not hold one that
  // holds it), libuv's joins the reactor's, level-triggered: readable while libuv has events.
  // Stopping a poll only forgets the watcher; libuv drops the epoll entry lazily, at the next
  // event it cannot deliver, so the entry is removed here, as libuv would have.
  poll_->Stop();
  epoll_event ev{};
  (void)::epoll_ctl(uvfd, EPOLL_CTL_DEL, epfd_, &ev);
  ev.events = EPOLLIN;
  ev.data.u64 = kLoopToken;
  if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, uvfd, &ev) != 0) {
    Nest();
    loop_->Run();
    return;
  }
  epoll_event events[kBatch];
  while (!loop_->stop_requested()) {
    int timeout = -1;  // nothing but sockets here: wait for them
    if (uv_loop_alive(uv)) {
      uv_update_time(uv);
      timeout = uv_backend_timeout(uv);
    } else if (live_ == 0) {
      break;  // nothing left anywhere
    }
    int n = ::epoll_wait(epfd_, events, kBatch, timeout);
    if (n < 0) n = 0;  // only EINTR, on our own fd: a signal, which libuv's fd reports next
    uv_update_time(uv);
    bool loop_ready = Collect(events, n);
    RunDue();
    loop_->RunDeferred();
    if (loop_ready || LoopDue()) uv_run(uv, UV_RUN_NOWAIT);
  }
  loop_->ClearStop();
  ::epoll_ctl(epfd_, EPOLL_CTL_DEL, uvfd, &ev);
  Nest();
}

void Reactor::Enqueue(IoWatch* w) {
  if (w->queued_) return;  // keeps its place in line; its flags say what happened since
  w->queued_ = true;
  due_.push_back(w);
}

void Reactor::ScheduleTurn() {
  if (turn_scheduled_) return;
  turn_scheduled_ = true;
  loop_->Defer(lifetime_.Guard([this] {
    turn_scheduled_ = false;
    RunDue();
  }));
}

void Reactor::RunDue() {
  dispatching_ = true;
  // Those who get in line meanwhile (a Yield() from a callback) wait for the next turn.
  size_t in_line = due_.size();
  int served = 0;
  for (; in_line > 0 && served < kDispatchBudget; --in_line) {
    IoWatch* w = due_.front();
    due_.pop_front();
    w->queued_ = false;
    if (w->dead_ || !w->cb_) continue;
    RunCallback(w);
    ++served;
  }
  dispatching_ = false;
  // The rest wait for the next turn, when timers and other handles have had theirs.
  if (!due_.empty()) ScheduleTurn();
  Reap();
}

void Reactor::RunCallback(IoWatch* w) {
  IoWatch::Callback cb = std::move(w->cb_);
  w->cb_ = nullptr;
  w->replaced_ = false;
  cb(w);
  if (!w->replaced_) w->cb_ = std::move(cb);
}

void Reactor::Retire(IoWatch* w, bool close_fd) {
  w->dead_ = true;
  if (--live_ == 0) poll_->Unref();
  // Events still pending for the old generation, or arriving later through a dup of the fd,
  // find another generation and are dropped; the slot may be reused at once.
  Slot& slot = slots_[w->slot_];
  slot.watch = nullptr;
  ++slot.generation;
  free_slots_.push_back(w->slot_);
  if (!close_fd || w->shared_) {
    epoll_event ev{};
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, w->fd_, &ev);
  }
  if (close_fd) ::close(w->fd_);
  dead_.push_back(w);
  // Freed after whatever dispatch or line of callbacks may still point at it.
  if (dispatching_ || reap_scheduled_) return;
  reap_scheduled_ = true;
  loop_->Defer(lifetime_.Guard([this] { Reap(); }));
}

void Reactor::Reap() {
  reap_scheduled_ = false;
  std::vector<IoWatch*> keep;
  for (IoWatch* w : dead_) {
    if (w->queued_) {
      keep.push_back(w);  // still in line: freed after its turn came
    } else {
      delete w;
    }
  }
  dead_.swap(keep);
}

}  // namespace brokerproxy::loop
