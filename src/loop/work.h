// Work on libuv's thread pool, and name resolution (which also runs there).
//
// Both return a Pending token. Dropping the token before completion detaches the callback: it
// is then never called (a job that already started still runs to its end on the pool, and its
// results are discarded on the loop thread). So an owner that holds the token may die at any
// time without a late callback reaching it. A token that is kept does not make the owner wait.
//
// Loop-thread only, except the `work` function itself, which runs on a pool thread and must
// touch nothing that the loop thread uses meanwhile.

#ifndef BROKERPROXY_LOOP_WORK_H_
#define BROKERPROXY_LOOP_WORK_H_

#include <sys/socket.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loop/loop.h"

namespace brokerproxy::loop {

namespace internal {
struct PendingState;
}

// Owner-side handle of an asynchronous request. Movable, not copyable.
class Pending {
 public:
  Pending() = default;
  explicit Pending(internal::PendingState* state);
  Pending(Pending&& other) noexcept;
  Pending& operator=(Pending&& other) noexcept;
  Pending(const Pending&) = delete;
  Pending& operator=(const Pending&) = delete;
  ~Pending() { Detach(); }

  // True until the callback ran or the request was detached.
  bool active() const { return state_ != nullptr; }
  // Cancels if not started yet; the callback will not be called.
  void Detach();

 private:
  friend struct internal::PendingState;
  internal::PendingState* state_ = nullptr;
};

// Runs `fn` on a later loop iteration (Loop::Defer), unless the token was dropped first.
Pending Post(Loop& loop, std::function<void()> fn);

// A token for a request its issuer answers itself (e.g. one answer shared by several
// callers): `*attached` is set true, and false once the owner drops or detaches the token;
// the issuer checks it before calling back. active() stays true until the token is dropped.
Pending WatchPending(std::shared_ptr<bool> attached);

// Runs `work` on the thread pool, then `after` on the loop thread.
Pending QueueWork(Loop& loop, std::function<void()> work, std::function<void()> after);

// Resolves `host` (a name or a numeric address) and `port` to TCP socket addresses, IPv4 and
// IPv6, in the order getaddrinfo gives them. Numeric addresses are answered without the pool,
// on a later loop iteration.
//
// getaddrinfo blocks a pool thread for as long as DNS takes (tens of seconds when a server
// does not answer), and disk writes share that pool. So at most kMaxResolvesInFlight look-ups
// of a loop thread occupy the pool at once; more wait for a slot, in order. A look-up without
// an answer within kResolveTimeoutMs (waiting for a slot included) is answered Timeout; its
// late answer, if one comes, is dropped (the slot is held until then: the thread is).
//
// A look-up may name a `group` (the daemon: the uid owning the job whose backend is resolved):
// at most kMaxResolvesPerGroup look-ups of one group occupy the pool at once, so names of one
// user that never resolve leave slots for everyone else's. Look-ups without a group share the
// slots with no cap of their own.
inline constexpr int kMaxResolvesInFlight = 4;
inline constexpr int kMaxResolvesPerGroup = 2;
inline constexpr uint64_t kResolveTimeoutMs = 5000;
inline constexpr uint64_t kNoResolveGroup = ~uint64_t{0};
using ResolveCallback = std::function<void(Result<std::vector<sockaddr_storage>>)>;
Pending Resolve(Loop& loop, const std::string& host, int port, ResolveCallback cb,
                uint64_t group = kNoResolveGroup);

// Look-ups of this thread's loop still on the pool, answered or not (the loop cannot close
// before they return).
int ResolvesOnPool();

// Makes libuv's thread pool at least kMaxResolvesInFlight + kPoolThreadsBesidesDns threads
// (UV_THREADPOOL_SIZE, unless it already asks for more), so that work other than DNS always
// finds a thread. Effective only before the pool's first use: call it first thing in main
// thread start-up, before any other thread runs (it calls setenv).
inline constexpr int kPoolThreadsBesidesDns = 4;
void ReserveThreadPool();

// Parses a numeric IPv4/IPv6 address (no brackets) and port; nullopt if not numeric.
std::optional<sockaddr_storage> ParseNumericAddress(const std::string& host, int port);

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_WORK_H_
