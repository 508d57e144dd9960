#include "loop/handle.h"

namespace brokerproxy::loop {

void HandleBase::Close() noexcept {
  if (!initialized_) {
    // uv_*_init failed or never ran: libuv does not know this handle.
    delete this;
    return;
  }
  if (closing_) return;
  closing_ = true;
  OnClosing();
  uv_close(uv_handle_, &HandleBase::OnClosed);
}

void HandleBase::OnClosed(uv_handle_t* h) noexcept { delete static_cast<HandleBase*>(h->data); }

}  // namespace brokerproxy::loop
