#include "loop/timer.h"

namespace brokerproxy::loop {

Result<HandlePtr<Timer>> Timer::Create(Loop& loop) {
  HandlePtr<Timer> t(new Timer(loop));
  int rc = uv_timer_init(loop.get(), &t->timer_);
  if (rc != 0) return UvError("uv_timer_init", rc);
  t->MarkInitialized();
  return t;
}

void Timer::Start(uint64_t timeout_ms, uint64_t repeat_ms, Callback cb) {
  cb_ = std::move(cb);
  uv_timer_start(&timer_, &Timer::OnTimer, timeout_ms, repeat_ms);
}

void Timer::Stop() { uv_timer_stop(&timer_); }

void Timer::OnTimer(uv_timer_t* t) noexcept {
  auto* self = static_cast<Timer*>(t->data);
  if (self->closing() || !self->cb_) return;
  // Copy so that a callback which restarts this timer with a new callback does not destroy the
  // function object that is running.
  Callback cb = self->cb_;
  cb();
}

}  // namespace brokerproxy::loop
