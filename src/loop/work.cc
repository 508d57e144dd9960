#include "loop/work.h"

#include <netdb.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <unordered_map>

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

struct DeferredState final : PendingState {
  void Cancel() override {}  // the deferred function checks `owner`
};

// Owned by its token alone: dropping the token tells the issuer and frees the state.
struct WatchState final : PendingState {
  std::shared_ptr<bool> attached;
  void Cancel() override {
    *attached = false;
    delete this;
  }
};

}  // namespace

Pending WatchPending(std::shared_ptr<bool> attached) {
  auto* st = new WatchState;
  *attached = true;
  st->attached = std::move(attached);
  return Pending(st);
}

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

namespace {

// A name look-up: queued for a pool slot, then running on the pool, with a timeout timer from
// the start. Freed once the timer is closed and getaddrinfo (if it started) has returned.
struct ResolveState final : PendingState {
  Loop* loop = nullptr;
  uv_getaddrinfo_t req{};
  uv_timer_t timer{};
  int port = 0;
  uint64_t group = kNoResolveGroup;
  std::string host;
  ResolveCallback cb;
  bool queued = false;   // waiting for a slot
  bool running = false;  // getaddrinfo on the pool
  bool timer_open = true;

  // The owner went: stop waiting (a running getaddrinfo finishes on its own).
  void Cancel() override { Finish(); }
  void Finish();
  void MaybeDelete() {
    if (!running && !timer_open) delete this;
  }
};

// Per loop thread (every loop runs on one thread): look-ups on the pool, and those waiting.
thread_local int resolves_in_flight = 0;
thread_local std::unordered_map<uint64_t, int> resolves_of_group;  // on the pool, by group
thread_local std::deque<ResolveState*> resolves_waiting;

bool MayStart(uint64_t group) {
  if (resolves_in_flight >= kMaxResolvesInFlight) return false;
  if (group == kNoResolveGroup) return true;
  auto it = resolves_of_group.find(group);
  return it == resolves_of_group.end() || it->second < kMaxResolvesPerGroup;
}

void CountResolve(uint64_t group, int delta) {
  resolves_in_flight += delta;
  if (group == kNoResolveGroup) return;
  if ((resolves_of_group[group] += delta) == 0) resolves_of_group.erase(group);
}

void ResolveState::Finish() {
  if (queued) {
    resolves_waiting.erase(std::find(resolves_waiting.begin(), resolves_waiting.end(), this));
    queued = false;
  }
  if (running) uv_cancel(reinterpret_cast<uv_req_t*>(&req));  // only if not started yet
  if (timer_open && !uv_is_closing(reinterpret_cast<uv_handle_t*>(&timer))) {
    uv_close(reinterpret_cast<uv_handle_t*>(&timer), [](uv_handle_t* h) noexcept {
      auto* st = static_cast<ResolveState*>(h->data);
      st->timer_open = false;
      st->MaybeDelete();
    });
  }
}

// Delivers `result` if the owner is still there. `st` may be freed by the time this returns.
void Answer(ResolveState* st, Result<std::vector<sockaddr_storage>> result) {
  if (!st->owner) return;
  ResolveCallback cb = std::move(st->cb);
  st->Unlink();
  st->Finish();
  cb(std::move(result));
}

Result<std::vector<sockaddr_storage>> Addresses(const ResolveState& st, int status, addrinfo* res) {
  if (status != 0) return UvError("cannot resolve " + st.host, status);
  std::vector<sockaddr_storage> out;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
    sockaddr_storage ss{};
    std::memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
    if (ai->ai_family == AF_INET) {
      reinterpret_cast<sockaddr_in*>(&ss)->sin_port = htons(st.port);
    } else {
      reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port = htons(st.port);
    }
    out.push_back(ss);
  }
  if (out.empty()) return Status::NotFound("no address for " + st.host);
  return out;
}

void StartWaitingResolves();

void OnResolved(uv_getaddrinfo_t* r, int status, addrinfo* res) noexcept {
  auto* st = static_cast<ResolveState*>(r->data);
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(res, uv_freeaddrinfo);
  st->running = false;
  CountResolve(st->group, -1);
  // A slot is free: hand it on before answering, whatever the callback does.
  StartWaitingResolves();
  if (st->owner) {
    Answer(st, Addresses(*st, status, res));  // may free st
    return;
  }
  st->MaybeDelete();  // timed out or detached: the late answer is dropped
}

// Puts `st` on the pool; false (and `*error`) if libuv refused it.
bool StartResolve(ResolveState* st, Status* error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  st->running = true;
  CountResolve(st->group, +1);
  int rc = uv_getaddrinfo(st->loop->get(), &st->req, OnResolved, st->host.c_str(), nullptr, &hints);
  if (rc != 0) {
    st->running = false;
    CountResolve(st->group, -1);
    *error = UvError("cannot resolve " + st->host, rc);
    return false;
  }
  return true;
}

// The first waiting look-up whose group may start, in order, while slots are free.
void StartWaitingResolves() {
  for (;;) {
    auto it = std::find_if(resolves_waiting.begin(), resolves_waiting.end(),
                           [](const ResolveState* st) { return MayStart(st->group); });
    if (it == resolves_waiting.end()) return;
    ResolveState* st = *it;
    resolves_waiting.erase(it);
    st->queued = false;
    Status error;
    // Inside a libuv callback, never inside Resolve(): a failure may be answered right here.
    if (!StartResolve(st, &error)) Answer(st, error);
  }
}

}  // namespace

int ResolvesOnPool() { return resolves_in_flight; }

void ReserveThreadPool() {
  constexpr int kWant = kMaxResolvesInFlight + kPoolThreadsBesidesDns;
  const char* env = std::getenv("UV_THREADPOOL_SIZE");
  if (env != nullptr && std::atoi(env) >= kWant) return;
  ::setenv("UV_THREADPOOL_SIZE", std::to_string(kWant).c_str(), 1);
}

Pending Resolve(Loop& loop, const std::string& host, int port, ResolveCallback cb, uint64_t group) {
  if (auto numeric = ParseNumericAddress(host, port)) {
    return Post(loop,
                [cb = std::move(cb), addr = *numeric] { cb(std::vector<sockaddr_storage>{addr}); });
  }
  auto* st = new ResolveState;
  st->loop = &loop;
  st->req.data = st;
  st->timer.data = st;
  st->port = port;
  st->group = group;
  st->host = host;
  st->cb = std::move(cb);
  int rc = uv_timer_init(loop.get(), &st->timer);
  if (rc != 0) {
    ResolveCallback cb2 = std::move(st->cb);
    delete st;  // the timer was never opened
    return Post(loop,
                [cb2 = std::move(cb2), err = UvError("cannot resolve " + host, rc)] { cb2(err); });
  }
  uv_timer_start(
      &st->timer,
      [](uv_timer_t* t) noexcept {
        auto* st = static_cast<ResolveState*>(t->data);
        Answer(st, Status::Timeout("cannot resolve " + st->host + ": no answer within " +
                                   std::to_string(kResolveTimeoutMs / 1000) + " s"));
      },
      kResolveTimeoutMs, 0);
  Pending token(st);
  if (!MayStart(group)) {
    st->queued = true;
    resolves_waiting.push_back(st);
    return token;
  }
  Status error;
  if (!StartResolve(st, &error)) {
    // Report on a later iteration, as for every other outcome.
    ResolveCallback cb2 = std::move(st->cb);
    st->Unlink();
    st->Finish();
    return Post(loop, [cb2 = std::move(cb2), error] { cb2(error); });
  }
  return token;
}

}  // namespace brokerproxy::loop
