// Signal: a libuv signal watcher (the callback runs on the loop, not in signal context).
// Loop-thread only; lifetime rules in loop/handle.h.

#ifndef BROKERPROXY_LOOP_SIGNAL_H_
#define BROKERPROXY_LOOP_SIGNAL_H_

#include <functional>

#include "loop/handle.h"

namespace brokerproxy::loop {

class Signal final : public HandleBase {
 public:
  using Callback = std::function<void(int signum)>;

  static Result<HandlePtr<Signal>> Create(Loop& loop);

  Status Start(int signum, Callback cb);
  void Stop() { uv_signal_stop(&signal_); }

 private:
  explicit Signal(Loop& loop) : HandleBase(loop, reinterpret_cast<uv_handle_t*>(&signal_)) {}
  void OnClosing() override { uv_signal_stop(&signal_); }
  static void OnSignal(uv_signal_t* s, int signum) noexcept;

  uv_signal_t signal_{};
  Callback cb_;
};

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_SIGNAL_H_
