#include "loop/work.h"

#include <netdb.h>

#include <cstring>
#include <optional>

namespace brokerproxy::loop {
namespace internal {

// Lives until libuv's completion callback; linked both ways with its Pending token so that
// either side can go first.
struct PendingState {
  Pending* owner = nullptr;
  void Unlink() {
    if (owner) owner->state_ = nullptr;
    owner = nullptr;
  }
  virtual ~PendingState() = default;
  virtual void Cancel() = 0;
};

}  // namespace internal

using internal::PendingState;

Pending::Pending(PendingState* state) : state_(state) { state_->owner = this; }

Pending::Pending(Pending&& other) noexcept : state_(other.state_) {
  other.state_ = nullptr;
  if (state_) state_->owner = this;
}

Pending& Pending::operator=(Pending&& other) noexcept {
  if (this != &other) {
    Detach();
    state_ = other.state_;
    other.state_ = nullptr;
    if (state_) state_->owner = this;
  }
  return *this;
}

void Pending::Detach() {
  if (!state_) return;
  PendingState* s = state_;
  s->owner = nullptr;
  state_ = nullptr;
  s->Cancel();
}

namespace {

struct WorkState final : PendingState {
  uv_work_t req{};
  std::function<void()> work;
  std::function<void()> after;
  void Cancel() override { uv_cancel(reinterpret_cast<uv_req_t*>(&req)); }
};

struct ResolveState final : PendingState {
  uv_getaddrinfo_t req{};
  int port = 0;
  std::string host;
  ResolveCallback cb;
  void Cancel() override { uv_cancel(reinterpret_cast<uv_req_t*>(&req)); }
};

struct DeferredState final : PendingState {
  void Cancel() override {}  // the deferred function checks `owner`
};

}  // namespace

Pending Post(Loop& loop, std::function<void()> fn) {
  auto* st = new DeferredState;
  Pending token(st);
  loop.Defer([st, fn = std::move(fn)] {
    std::unique_ptr<DeferredState> owned(st);
    if (!st->owner) return;
    st->Unlink();
    fn();
  });
  return token;
}

Pending QueueWork(Loop& loop, std::function<void()> work, std::function<void()> after) {
  auto* st = new WorkState;
  st->req.data = st;
  st->work = std::move(work);
  st->after = std::move(after);
  Pending token(st);
  int rc = uv_queue_work(
      loop.get(), &st->req, [](uv_work_t* r) noexcept { static_cast<WorkState*>(r->data)->work(); },
      [](uv_work_t* r, int) noexcept {
        std::unique_ptr<WorkState> st(static_cast<WorkState*>(r->data));
        if (!st->owner) return;  // detached (or cancelled)
        st->Unlink();
        if (st->after) st->after();
      });
  // uv_queue_work fails only for a null work callback.
  (void)rc;
  return token;
}

std::optional<sockaddr_storage> ParseNumericAddress(const std::string& host, int port) {
  sockaddr_storage ss{};
  if (uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&ss)) == 0) return ss;
  ss = {};
  if (uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&ss)) == 0) return ss;
  return std::nullopt;
}

Pending Resolve(Loop& loop, const std::string& host, int port, ResolveCallback cb) {
  if (auto numeric = ParseNumericAddress(host, port)) {
    return Post(loop,
                [cb = std::move(cb), addr = *numeric] { cb(std::vector<sockaddr_storage>{addr}); });
  }
  auto* st = new ResolveState;
  st->req.data = st;
  st->port = port;
  st->host = host;
  st->cb = std::move(cb);
  Pending token(st);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  int rc = uv_getaddrinfo(
      loop.get(), &st->req,
      [](uv_getaddrinfo_t* r, int status, addrinfo* res) noexcept {
        std::unique_ptr<ResolveState> st(static_cast<ResolveState*>(r->data));
        std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(res, uv_freeaddrinfo);
        if (!st->owner) return;
        st->Unlink();
        if (status != 0) {
          st->cb(UvError("cannot resolve " + st->host, status));
          return;
        }
        std::vector<sockaddr_storage> out;
        for (addrinfo* ai = res; ai; ai = ai->ai_next) {
          if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
          sockaddr_storage ss{};
          std::memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
          if (ai->ai_family == AF_INET) {
            reinterpret_cast<sockaddr_in*>(&ss)->sin_port = htons(st->port);
          } else {
            reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port = htons(st->port);
          }
          out.push_back(ss);
        }
        if (out.empty()) {
          st->cb(Status::NotFound("no address for " + st->host));
          return;
        }
        st->cb(std::move(out));
      },
      host.c_str(), nullptr, &hints);
  if (rc != 0) {
    // Report on a later iteration, as for every other outcome.
    Status err = UvError("cannot resolve " + host, rc);
    ResolveCallback cb2 = std::move(st->cb);
    st->Unlink();
    delete st;
    return Post(loop, [cb2 = std::move(cb2), err] { cb2(err); });
  }
  return token;
}

}  // namespace brokerproxy::loop
