// Loop: one libuv event loop and its next-tick queue.
//
// Every brokerproxy process runs exactly one Loop on its main thread; all handles, timers and
// callbacks below belong to it. Work that blocks (disk, key generation, DNS) goes to the libuv
// thread pool through loop/work.h and comes back here.
//
// Ownership: whoever creates the Loop owns it; every handle created on it must be released
// before the Loop is closed or destroyed. Loop-thread only.

#ifndef BROKERPROXY_LOOP_LOOP_H_
#define BROKERPROXY_LOOP_LOOP_H_

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "loop/status.h"

namespace brokerproxy::loop {

// Status from a libuv error code: "<context>: <uv_strerror(rc)>", with UV_ENOENT -> NotFound,
// UV_EACCES/UV_EPERM -> PermissionDenied, UV_ECONNREFUSED -> Unavailable, UV_ETIMEDOUT ->
// Timeout, UV_EADDRINUSE -> AlreadyExists, UV_EMFILE/UV_ENFILE/UV_ENOMEM -> ResourceExhausted.
Status UvError(std::string_view context, int rc);

class Loop {
 public:
  static Result<std::unique_ptr<Loop>> Create();

  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;
  // Closes the loop (see Close()); a loop that still has live handles is a bug in the caller:
  // the handles are printed to stderr and the loop's memory is deliberately leaked so that no
  // callback can run on freed memory.
  ~Loop();

  uv_loop_t* get() { return &loop_; }

  // Runs until Stop() or until nothing is left to do. Returns what uv_run returned.
  int Run(uv_run_mode mode = UV_RUN_DEFAULT) {
    int r = uv_run(&loop_, mode);
    stop_requested_ = false;
    return r;
  }
  // Makes Run() (or Reactor::Run()) return after the current iteration.
  void Stop() {
    stop_requested_ = true;
    uv_stop(&loop_);
  }
  // Stop() was called and the run it ends has not returned yet. For a driver of the loop
  // other than Run() (Reactor::Run()), which clears it with ClearStop() on its way out.
  bool stop_requested() const { return stop_requested_; }
  void ClearStop() { stop_requested_ = false; }

  // The loop's cached time in milliseconds (monotonic).
  uint64_t Now() const { return uv_now(&loop_); }

  // Runs `fn` on a later loop iteration, never inside this call; deferred while the queue runs,
  // it waits for the next. Used to destroy objects outside their own callback stack and to
  // deliver results known at once (docs/ARCHITECTURE.md, "Later, never inside").
  void Defer(std::function<void()> fn);
  // Runs what was deferred until now (what these functions defer waits for the next call).
  // The idle phase of every loop iteration does this; a driver of the loop other than Run()
  // may do it between its own steps, outside any callback.
  void RunDeferred();

  // Closes internal handles, runs the loop until every pending close callback has fired and
  // closes the uv loop. Fails (and leaves the loop open) when handles are still alive.
  Status Close();

 private:
  Loop() = default;
  static void OnIdle(uv_idle_t* idle);

  uv_loop_t loop_{};
  uv_idle_t idle_{};
  bool idle_active_ = false;
  bool closed_ = false;
  bool stop_requested_ = false;
  std::vector<std::function<void()>> deferred_;
};

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_LOOP_H_
