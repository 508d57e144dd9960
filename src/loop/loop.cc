#include "loop/loop.h"

#include <cstdio>
#include <string>

namespace brokerproxy::loop {

Status UvError(std::string_view context, int rc) {
  std::string msg(context);
  msg += ": ";
  msg += uv_strerror(rc);
  switch (rc) {
    case UV_ENOENT:
      return Status::NotFound(msg);
    case UV_EACCES:
    case UV_EPERM:
      return Status::PermissionDenied(msg);
    case UV_ECONNREFUSED:
      return Status::Unavailable(msg);
    case UV_ETIMEDOUT:
      return Status::Timeout(msg);
    case UV_EADDRINUSE:
      return Status::AlreadyExists(msg);
    case UV_EMFILE:
    case UV_ENFILE:
    case UV_ENOMEM:
      return Status::ResourceExhausted(msg);
    default:
      return Status::IOError(msg);
  }
}

Result<std::unique_ptr<Loop>> Loop::Create() {
  std::unique_ptr<Loop> loop(new Loop());
  int rc = uv_loop_init(&loop->loop_);
  if (rc != 0) {
    loop->closed_ = true;
    return UvError("uv_loop_init", rc);
  }
  rc = uv_idle_init(&loop->loop_, &loop->idle_);
  if (rc != 0) {
    uv_loop_close(&loop->loop_);
    loop->closed_ = true;
    return UvError("uv_idle_init", rc);
  }
  loop->idle_.data = loop.get();
  // The idle handle must not keep Run() alive by itself when nothing is deferred.
  uv_unref(reinterpret_cast<uv_handle_t*>(&loop->idle_));
  return loop;
}

Loop::~Loop() {
  if (closed_) return;
  Status s = Close();
  if (!s.ok()) {
    std::fprintf(stderr, "brokerproxy: %s; live handles:\n", s.ToString().c_str());
    uv_print_all_handles(&loop_, stderr);
    // Leak rather than free memory that libuv still points into.
  }
}

void Loop::Defer(std::function<void()> fn) {
  deferred_.push_back(std::move(fn));
  if (!idle_active_ && !closed_) {
    // An active idle handle makes the next poll non-blocking; ref'd while work is queued so
    // Run() does not return with deferred work pending.
    uv_idle_start(&idle_, &Loop::OnIdle);
    uv_ref(reinterpret_cast<uv_handle_t*>(&idle_));
    idle_active_ = true;
  }
}

void Loop::OnIdle(uv_idle_t* idle) { static_cast<Loop*>(idle->data)->RunDeferred(); }

void Loop::RunDeferred() {
  std::vector<std::function<void()>> batch;
  batch.swap(deferred_);
  for (auto& fn : batch) fn();
  if (deferred_.empty() && idle_active_) {
    uv_idle_stop(&idle_);
    uv_unref(reinterpret_cast<uv_handle_t*>(&idle_));
    idle_active_ = false;
  }
}

Status Loop::Close() {
  if (closed_) return Status::OK();
  // Drain the deferred queue and every pending close callback first.
  while (!deferred_.empty()) uv_run(&loop_, UV_RUN_NOWAIT);
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&idle_))) {
    uv_close(reinterpret_cast<uv_handle_t*>(&idle_), nullptr);
  }
  idle_active_ = false;
  uv_run(&loop_, UV_RUN_NOWAIT);
  int rc = uv_loop_close(&loop_);
  if (rc != 0) return UvError("uv_loop_close", rc);
  closed_ = true;
  return Status::OK();
}

}  // namespace brokerproxy::loop
