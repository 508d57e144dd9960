#include "loop/reactor.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>

namespace brokerproxy::loop {
namespace {

constexpr int kBatch = 256;
// Batches drained per libuv wake-up before other handles get a turn.
constexpr int kMaxBatches = 4;

}  // namespace

void IoWatch::Yield() {
  if (yielded_ || dead_) return;
  yielded_ = true;
  Reactor* r = reactor_;
  r->yielded_.push_back(this);
  if (r->yield_scheduled_) return;
  r->yield_scheduled_ = true;
  std::weak_ptr<bool> alive = r->alive_;
  r->loop_->Defer([r, alive] {
    if (!alive.expired()) r->RunYielded();
  });
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
  Reactor* raw = r.get();
  // The epoll fd is readable while any socket in the set has an event pending.
  r->poll_->Start(UV_READABLE, [raw](int, int) { raw->Dispatch(); });
  // Like any handle, the reactor keeps Loop::Run() going only while it watches something.
  r->poll_->Unref();
  return r;
}

Reactor::~Reactor() {
  *alive_ = false;
  poll_.reset();  // closes the epoll fd
  for (IoWatch* w : dead_) delete w;
}

Result<IoHandle> Reactor::Add(int fd, IoWatch::Callback cb, Sharing sharing) {
  auto* w = new IoWatch(this, fd);
  w->cb_ = std::move(cb);
  w->shared_ = sharing == Sharing::kShared;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.ptr = w;
  if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
    Status s = PosixError("epoll_ctl", errno);
    ::close(fd);
    delete w;
    return s;
  }
  if (live_++ == 0) poll_->Ref();
  return IoHandle(w);
}

void Reactor::Dispatch() {
  dispatching_ = true;
  epoll_event events[kBatch];
  for (int batch = 0; batch < kMaxBatches; ++batch) {
    int n = ::epoll_wait(epfd_, events, kBatch, 0);
    for (int i = 0; i < n; ++i) {
      auto* w = static_cast<IoWatch*>(events[i].data.ptr);
      if (w->dead_) continue;  // closed earlier in this batch; its memory is still ours
      uint32_t e = events[i].events;
      if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) w->readable_ = true;
      if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) w->writable_ = true;
      if (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) w->hangup_ = true;
      if (w->cb_) RunCallback(w);
    }
    if (n < kBatch) break;
  }
  dispatching_ = false;
  Reap();
}

void Reactor::RunYielded() {
  yield_scheduled_ = false;
  std::vector<IoWatch*> batch;
  batch.swap(yielded_);
  dispatching_ = true;
  for (IoWatch* w : batch) {
    w->yielded_ = false;
    if (!w->dead_ && w->cb_) RunCallback(w);
  }
  dispatching_ = false;
  Reap();
}

void Reactor::RunCallback(IoWatch* w) {
  IoWatch::Callback cb = std::move(w->cb_);
  w->cb_ = nullptr;
  uint64_t set_before = w->callbacks_set_;
  cb(w);
  if (w->callbacks_set_ == set_before) w->cb_ = std::move(cb);
}

void Reactor::Retire(IoWatch* w, bool close_fd) {
  w->dead_ = true;
  if (--live_ == 0) poll_->Unref();
  // Closing a private fd also takes it out of the epoll set; a shared one would stay in it,
  // reporting events for this watch after it is freed.
  if (!close_fd || w->shared_) {
    epoll_event ev{};
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, w->fd_, &ev);
  }
  if (close_fd) ::close(w->fd_);
  dead_.push_back(w);
  // Freed after whatever dispatch or yield list may still point at it.
  if (dispatching_ || reap_scheduled_) return;
  reap_scheduled_ = true;
  std::weak_ptr<bool> alive = alive_;
  loop_->Defer([this, alive] {
    if (!alive.expired()) Reap();
  });
}

void Reactor::Reap() {
  reap_scheduled_ = false;
  std::vector<IoWatch*> keep;
  for (IoWatch* w : dead_) {
    if (w->yielded_) {
      keep.push_back(w);  // still on the yield list: freed after it ran
    } else {
      delete w;
    }
  }
  dead_.swap(keep);
}

}  // namespace brokerproxy::loop
