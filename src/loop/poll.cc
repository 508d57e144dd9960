#include "loop/poll.h"

#include <unistd.h>

#include <cassert>

namespace brokerproxy::loop {

Result<HandlePtr<Poll>> Poll::Create(Loop& loop, int fd, FdOwnership ownership) {
  HandlePtr<Poll> p(new Poll(loop, fd, ownership));
  int rc = uv_poll_init_socket(loop.get(), &p->poll_, fd);
  if (rc != 0) {
    if (ownership == FdOwnership::kOwned) ::close(fd);
    p->owned_ = false;
    return UvError("uv_poll_init", rc);
  }
  p->MarkInitialized();
  return p;
}

void Poll::Start(int events, Callback cb) {
  cb_ = std::move(cb);
  events_ = -1;  // force the uv call
  SetEvents(events);
}

void Poll::SetEvents(int events) {
  if (events == events_ || closing()) return;
  events_ = events;
  if (events == 0) {
    uv_poll_stop(&poll_);
  } else {
    // Fails only for an fd libuv cannot watch, which Create() already checked.
    int rc = uv_poll_start(&poll_, events, &Poll::OnPoll);
    assert(rc == 0);
    (void)rc;
  }
}

int Poll::ReleaseFd() {
  assert(owned_);
  SetEvents(0);
  owned_ = false;
  return fd_;
}

void Poll::OnClosing() {
  uv_poll_stop(&poll_);
  events_ = 0;
  if (owned_) {
    // Safe right after uv_poll_stop()/uv_close(): libuv has already dropped the fd from epoll.
    ::close(fd_);
    owned_ = false;
  }
}

void Poll::OnPoll(uv_poll_t* p, int status, int events) noexcept {
  auto* self = static_cast<Poll*>(p->data);
  if (self->closing() || !self->cb_) return;
  // On POLLERR libuv stops the handle itself and reports UV_EBADF.
  if (status < 0) self->events_ = 0;
  // The callback may change the mask, replace itself (Start) or close the handle; all keep this
  // wrapper alive. It runs from a local so that replacing it does not destroy it mid-call.
  Callback cb = std::move(self->cb_);
  self->cb_ = nullptr;
  cb(status, events);
  if (!self->cb_) self->cb_ = std::move(cb);
}

}  // namespace brokerproxy::loop
