// The one lifetime rule of brokerproxy's libuv handles.
//
// Every wrapper (Timer, Signal, Poll, Tcp, Pipe, Process) is a heap object created by its
// static Create() and handed out as a HandlePtr<T>. Dropping the HandlePtr (reset(), or its
// destructor) *closes* the handle: reads, timers and polls stop at once, uv_close() is called,
// and from that moment on no user callback is invoked again. The wrapper itself is freed only
// in libuv's close callback, after libuv has delivered every cancelled request (pending writes,
// connects, shutdowns) to it. So:
//
//   - no libuv callback can ever run on freed memory, and
//   - the owner of a HandlePtr may destroy itself at any time, including from inside one of
//     the handle's own callbacks: the wrapper outlives the call stack that is running.
//
// The only way to close is to drop the pointer, so no code holds a pointer to a wrapper that
// its close callback has already freed. Raw pointers to a wrapper are valid only as long as
// its HandlePtr is held.
//
// Thread safety: loop-thread only, like libuv itself.

#ifndef BROKERPROXY_LOOP_HANDLE_H_
#define BROKERPROXY_LOOP_HANDLE_H_

#include <uv.h>

#include <memory>

#include "loop/loop.h"

namespace brokerproxy::loop {

class HandleBase {
 public:
  HandleBase(const HandleBase&) = delete;
  HandleBase& operator=(const HandleBase&) = delete;

  Loop& loop() const { return loop_; }
  // True once the owner has dropped its HandlePtr; callbacks are no longer delivered.
  bool closing() const { return closing_; }

  // Keeps or stops the handle from keeping Loop::Run() alive (uv_ref/uv_unref).
  void Ref() { uv_ref(uv_handle_); }
  void Unref() { uv_unref(uv_handle_); }

 protected:
  // `h` is the wrapper's own libuv handle member; it is initialised by the derived class.
  HandleBase(Loop& loop, uv_handle_t* h) : loop_(loop), uv_handle_(h) {}
  virtual ~HandleBase() = default;

  // Derived classes call this right after their uv_*_init succeeded.
  void MarkInitialized() {
    uv_handle_->data = this;
    initialized_ = true;
  }
  // Hook run once when closing starts, before uv_close(): stop reads, close owned fds, ...
  virtual void OnClosing() {}

 private:
  friend struct HandleCloser;
  void Close() noexcept;
  static void OnClosed(uv_handle_t* h) noexcept;

  Loop& loop_;
  uv_handle_t* uv_handle_;
  bool initialized_ = false;
  bool closing_ = false;
};

struct HandleCloser {
  void operator()(HandleBase* h) const noexcept { h->Close(); }
};

template <typename T>
using HandlePtr = std::unique_ptr<T, HandleCloser>;

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_HANDLE_H_
