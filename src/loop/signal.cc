#include "loop/signal.h"

namespace brokerproxy::loop {

Result<HandlePtr<Signal>> Signal::Create(Loop& loop) {
  HandlePtr<Signal> s(new Signal(loop));
  int rc = uv_signal_init(loop.get(), &s->signal_);
  if (rc != 0) return UvError("uv_signal_init", rc);
  s->MarkInitialized();
  return s;
}

Status Signal::Start(int signum, Callback cb) {
  cb_ = std::move(cb);
  int rc = uv_signal_start(&signal_, &Signal::OnSignal, signum);
  return rc == 0 ? Status::OK() : UvError("uv_signal_start", rc);
}

void Signal::OnSignal(uv_signal_t* s, int signum) noexcept {
  auto* self = static_cast<Signal*>(s->data);
  if (self->closing() || !self->cb_) return;
  Callback cb = self->cb_;
  cb(signum);
}

}  // namespace brokerproxy::loop
