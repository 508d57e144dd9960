// Dialer: a non-blocking TCP connect to host:port, trying each resolved address in turn.
//
// Names are resolved on the thread pool (loop/work.h: bounded in time and in look-ups at once)
// through a small cache shared by all dials (ResolveCache), so a busy job does not cost one
// getaddrinfo per connection, nor does a name that fails; a numeric
// address is connected to at once, inside Dial(). The socket is registered in the Reactor
// from the start and handed over as the IoHandle that owns it, with what the reactor learnt
// of its readiness (a backend that speaks first, like sshd, may already be readable).
//
// Ownership: the caller owns the Dialer; dropping it cancels the attempt and closes the socket.
// `*reactor` and `*cache` must outlive it. The callback runs at most once, never inside Dial(),
// and the Dialer may be destroyed from inside it. Loop-thread only.

#ifndef BROKERPROXY_PROXY_TRANSPORT_DIALER_H_
#define BROKERPROXY_PROXY_TRANSPORT_DIALER_H_

#include <sys/socket.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "loop/loop.h"
#include "loop/reactor.h"
#include "loop/work.h"

namespace brokerproxy::proxy {

class ResolveCache {
 public:
  using Addresses = std::vector<sockaddr_storage>;
  using Callback = std::function<void(Result<Addresses>)>;

  // Failures (a name that does not exist, DNS that does not answer) are kept this long, or
  // `ttl_ms` if shorter: a job whose backend name does not resolve costs one look-up per period,
  // not one per connection, however many clients knock.
  static constexpr int64_t kNegativeTtlMs = 5000;

  // Answers are kept `ttl_ms`.
  ResolveCache(loop::Loop* loop, int64_t ttl_ms) : loop_(loop), ttl_ms_(ttl_ms) {}

  // As loop::Resolve (`group` too), served from the cache when fresh.
  loop::Pending Resolve(const std::string& host, int port, Callback cb,
                        uint64_t group = loop::kNoResolveGroup);

  // Tests only: answers for `host` are `addresses` (ports ignored) for the next `ttl_ms`, as if
  // looked up now, so a test can give a name several addresses without a name service.
  void SeedForTesting(const std::string& host, Addresses addresses);

 private:
  struct Entry {
    Result<Addresses> addresses = Addresses{};  // with port 0, or the failure
    uint64_t expires_ms = 0;
  };
  loop::Loop* loop_;
  int64_t ttl_ms_;
  std::unordered_map<std::string, Entry> entries_;
};

class Dialer {
 public:
  using Callback = std::function<void(Result<loop::IoHandle>)>;
  // Says whether an address (with its port) may be connected to; an error skips it, and is
  // what the callback reports if no address is left (proxy/server/backend_policy.h).
  using AddressCheck = std::function<Status(const sockaddr_storage& addr)>;

  Dialer(loop::Reactor* reactor, ResolveCache* cache) : reactor_(reactor), cache_(cache) {}
  Dialer(const Dialer&) = delete;
  Dialer& operator=(const Dialer&) = delete;

  // The look-up group of the name resolution (loop::Resolve), e.g. the uid owning the job.
  // Before Dial().
  void set_resolve_group(uint64_t group) { resolve_group_ = group; }

  // REQUIRES: called once. With `may_complete_inline`, a connection to a loopback address that
  // the kernel established inside connect() (it completes loopback handshakes in the call) is
  // reported from inside Dial(), as its last action, sparing a loop turn: then the caller must
  // touch nothing of its own after Dial() returns, as the callback may have destroyed it.
  void Dial(const std::string& host, int port, Callback cb, bool may_complete_inline = false);
  // Installs a check run on each resolved address before connecting to it. Before Dial().
  void set_check(AddressCheck check) { check_ = std::move(check); }
  // Told how the dial ended, right before the callback runs: `connected`, or else `refused`
  // if some address refused the connection (ECONNREFUSED, also a local port that connected to
  // itself) or the check turned one away with NotFound or PermissionDenied (nothing, or the
  // wrong user's socket, listens there: proxy/server/backend_policy.h). Neither: the name did not
  // resolve, or the proxy could not even try (e.g. out of file descriptors). Must not destroy
  // this Dialer. Before Dial().
  using Observer = std::function<void(bool connected, bool refused)>;
  void set_observer(Observer observer) { observer_ = std::move(observer); }
  // Tunes the connected socket before the callback gets it: TCP_NODELAY, and keepalive with its
  // first probe after `keepalive_s` idle seconds (0: off; TuneTcpSocket) unless the backend is on
  // a loopback address, where the kernel answers the probes for any process, alive or hung, and
  // reports a process's death itself: probes there find nothing. Before Dial().
  void set_tuning(int keepalive_s) { keepalive_s_ = keepalive_s; }

 private:
  // Starts connecting to the next address; false when none is left.
  bool TryNext();
  void OnEvent(loop::IoWatch* watch);
  // The socket is writable or failed (or known `established`): report it, or try the next
  // address.
  void Connected(bool established);
  void Fail(Status status);

  loop::Reactor* reactor_;
  ResolveCache* cache_;
  uint64_t resolve_group_ = loop::kNoResolveGroup;
  Callback cb_;
  AddressCheck check_;
  Observer observer_;
  bool refused_ = false;   // see set_observer()
  int keepalive_s_ = -1;   // see set_tuning(); -1: not tuned
  std::string target_;     // "host:port", for messages
  loop::Pending pending_;  // a name being resolved, or a failure being reported
  std::vector<sockaddr_storage> addresses_;
  size_t next_ = 0;
  loop::IoHandle socket_;
  Status last_error_;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TRANSPORT_DIALER_H_
