// Timer: a libuv timer. Loop-thread only; lifetime rules in loop/handle.h.

#ifndef BROKERPROXY_LOOP_TIMER_H_
#define BROKERPROXY_LOOP_TIMER_H_

#include <cstdint>
#include <functional>

#include "loop/handle.h"

namespace brokerproxy::loop {

class Timer final : public HandleBase {
 public:
  using Callback = std::function<void()>;

  static Result<HandlePtr<Timer>> Create(Loop& loop);

  // Fires `cb` after `timeout_ms`, then every `repeat_ms` if non-zero. Restarting replaces the
  // previous schedule and callback.
  void Start(uint64_t timeout_ms, uint64_t repeat_ms, Callback cb);
  // Convenience: one shot.
  void Start(uint64_t timeout_ms, Callback cb) { Start(timeout_ms, 0, std::move(cb)); }
  void Stop();
  bool active() const { return uv_is_active(reinterpret_cast<const uv_handle_t*>(&timer_)); }

 private:
  explicit Timer(Loop& loop) : HandleBase(loop, reinterpret_cast<uv_handle_t*>(&timer_)) {}
  void OnClosing() override { uv_timer_stop(&timer_); }
  static void OnTimer(uv_timer_t* t) noexcept;

  uv_timer_t timer_{};
  Callback cb_;
};

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_TIMER_H_
