// Proxy: the one fixed port. Owns the listeners, every connection on them in any protocol, and
// what they share: the secret check against the live registry, the failure throttle, counters,
// the backend dialer's resolve cache, the pipe pool, and the timers for deadlines and idle
// sweeps.
//
// A connection starts as a Session (session.h) that sniffs the first byte. Plain preambles are
// handled there; TLS and SSH connections are handed to a Frontend installed by their own
// modules, which returns the Connection object that will own the socket from then on.
//
// Removing a job stops new sessions to it; plain and TLS sessions already spliced keep running on
// the copy of the job they took at their handshake (P9): a notebook must not die because its
// job record was replaced or removed; a user who wants them gone stops the service. An SSH
// session is different: it is a login that opens new backend connections (channels) for as
// long as it lasts, so it follows its job. Each channel open checks that the job still has the
// generation the session authenticated against (same record, so same owner and secret), and
// replacing or removing the job closes its SSH sessions at once (OnJobChanged()).
//
// Unauthenticated handshakes are bounded twice, so that clients who know a secret always find
// room: per source (max_handshakes_per_source: a remote address, or for loopback clients the
// uid owning the client socket, since every `ssh -L` user arrives from 127.0.0.1), and in all
// (handshake_share percent of max_connections; past that a new connection evicts the oldest
// handshake still in progress).
//
// Ownership: the daemon owns the Proxy; `*loop` and `*registry` must outlive it. Loop-thread
// only.

#ifndef BROKERPROXY_PROXY_SERVER_PROXY_H_
#define BROKERPROXY_PROXY_SERVER_PROXY_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <cJSON.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "loop/address.h"
#include "loop/handle.h"
#include "loop/lifetime.h"
#include "loop/loop.h"
#include "loop/reactor.h"
#include "loop/timer.h"
#include "proxy/server/backend_policy.h"
#include "proxy/server/listener.h"
#include "proxy/server/sniffer.h"
#include "proxy/server/stats.h"
#include "proxy/server/throttle.h"
#include "proxy/transport/dialer.h"
#include "proxy/transport/relay.h"
#include "proxy/wire/broker1.h"
#include "registry/job.h"
#include "registry/registry.h"

namespace brokerproxy::proxy {

struct ProxyOptions {
  std::vector<HostPort> listen{{"127.0.0.1", 7000}};
  std::vector<Cidr> plain_allow;  // sources allowed to send a plain preamble
  // Networks of other hosts that backends may be on; nullopt: all (proxy/server/backend_policy.h).
  std::optional<std::vector<Cidr>> backend_allow;
  int max_connections = 4096;
  int64_t handshake_timeout_ms = 10000;
  int64_t connect_timeout_ms = 10000;
  int64_t idle_timeout_ms = 0;  // 0: off
  int64_t half_close_timeout_ms = 300000;
  int keepalive_s = 60;  // 0: off
  int throttle_failures = 10;
  int64_t throttle_window_ms = 60000;
  int max_handshakes_per_source = 64;  // 0: no per-source limit
  int handshake_share = 50;            // percent of max_connections
  int pipe_size = 1 << 20;             // splice pipe capacity asked for
  size_t pipe_pool = 64;               // idle pipes kept
  int64_t sweep_interval_ms = 1000;
  // A client silent this long after accept is taken for an SSH client that waits for the
  // server's banner (ssh-keyscan) and handed to the SSH frontend, which sends it. 0: never.
  int64_t ssh_banner_delay_ms = 300;
  std::string tls_domain = "localhost";  // for the hint answered to HTTP requests
  // How long the OK to a client that pipelined bytes behind its preamble may wait to leave in
  // one segment with the backend's first bytes (Session::Connected). 0: it leaves at once.
  int64_t held_ok_ms = 5;
};

class Proxy;

// One client connection on the proxy port, in whatever protocol. Subclasses own their sockets
// and handles; the Proxy owns the Connection.
class Connection {
 public:
  Connection(Proxy* proxy, const sockaddr_storage& peer);
  virtual ~Connection() = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Ends the connection now (shutdown, idle timeout, ...): releases every handle and calls
  // Proxy::Retire(). Idempotent.
  virtual void Close(const char* reason) = 0;
  // The deadline set with Proxy::SetDeadline() passed.
  virtual void OnDeadline() = 0;
  // Called every sweep interval: idle checks, counters.
  virtual void OnSweep(uint64_t now_ms) { (void)now_ms; }

  uint64_t id() const { return id_; }
  Proxy* proxy() const { return proxy_; }
  // The client's address (IPv4 or IPv6).
  const sockaddr* peer() const { return &peer_.any; }
  // "1.2.3.4:5678"
  std::string PeerString() const;
  uint64_t started_ms() const { return started_ms_; }
  // Seconds since the client's TCP connection was accepted (for a frontend's connection, since
  // the sniffer's: set_accepted_ns() from its Handoff), at nanosecond resolution.
  double SecondsSinceAccept() const;
  uint64_t accepted_ns() const { return accepted_ns_; }
  void set_accepted_ns(uint64_t ns) { accepted_ns_ = ns; }
  // Who the throttle and the handshake limits count this connection against: "addr:<ip>" for a
  // remote address, "uid:<uid>" for a loopback client whose owner the kernel named, "" if
  // unknown (then only the job id is counted). A loopback client's owner is looked up only
  // when something asks (Proxy::Source): see Proxy::OnAccept.
  const std::string& source() const { return source_; }
  // The job `id` was replaced or removed in the registry (Proxy::OnJobChanged).
  virtual void OnJobChanged(const std::string& id) { (void)id; }

 protected:
  // The client's socket while the handshake runs, for a late lookup of its owner; -1 if this
  // connection has none to offer (its source is then looked up before it is made).
  virtual int handshake_fd() const { return -1; }

  Proxy* proxy_;

 private:
  friend class Proxy;
  // A TCP peer's address in 28 bytes rather than a sockaddr_storage's 128: kept per connection.
  union Peer {
    sockaddr any;
    sockaddr_in in;
    sockaddr_in6 in6;
  };
  uint64_t id_ = 0;
  Peer peer_;
  bool pending_ = false;  // an unauthenticated handshake, counted in the proxy's limits
  bool retired_ = false;
  bool has_deadline_ = false;
  bool source_unknown_ = false;  // a loopback client whose owner was not looked up yet
  uint64_t started_ms_ = 0;
  uint64_t accepted_ns_ = 0;
  std::string source_;
  std::multimap<uint64_t, Connection*>::iterator deadline_;
};

// What the sniffer hands a TLS or SSH frontend: the client socket, with the bytes it peeked
// still unread in the kernel.
struct Handoff {
  loop::IoHandle
      client;  // in the reactor, no callback; its readiness flags as the sniffer left them
  sockaddr_storage peer;
  uint64_t accepted_ns = 0;  // when the sniffing connection was accepted (uv_hrtime)
};
using Frontend = std::function<std::unique_ptr<Connection>(Proxy* proxy, Handoff handoff)>;

// Where an authorised connection goes: a copy, valid however the registry changes later.
struct Target {
  std::string job_id;
  // The job's owner: whose listener the backend must be if it is on this node, and whose
  // share of name look-ups its backend's name uses.
  uid_t owner = 0;
  registry::JobType type = registry::JobType::kSsh;
  std::string host;
  int port = 0;
  uint64_t generation = 0;  // Registry::Generation() at the handshake
};

class Proxy {
 public:
  Proxy(loop::Loop* loop, const registry::Registry* registry, ProxyOptions options);
  ~Proxy();
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // Binds every listen address; fails if any cannot be bound.
  Status Start();
  // Stops accepting and closes every connection.
  void Stop();
  // Applies new options without touching established connections: listen addresses added
  // are bound (all of them, or none and an error), those removed are closed (their
  // connections stay); limits, timeouts, plain_allow, backend_allow, throttle and keepalive
  // take effect for what happens next (a sweep applies the new idle timeouts to every
  // session). pipe_size and pipe_pool stay as they were. REQUIRES: Start() succeeded.
  Status Reconfigure(ProxyOptions options);

  // Listening sockets handed over by an old process (an upgrade), by the listen address they
  // were configured as: Start() adopts them instead of binding those addresses, and closes any
  // left over. Call before Start().
  void set_inherited(std::vector<std::pair<HostPort, int>> listeners) {
    inherited_ = std::move(listeners);
  }
  // Duplicates of the listening sockets (without close-on-exec), with their listen addresses,
  // for a new process; the caller owns them.
  std::vector<std::pair<HostPort, int>> DupListeners() const;
  // Stops accepting (a new process accepts on the same sockets); connections go on.
  void StopListening();

  // The bound addresses, e.g. {"127.0.0.1:7000"}.
  std::vector<std::string> addresses() const;
  // Adds the proxy's counters to a `stats` reply; per-job counters only for jobs `caller` may
  // see (all for uid 0).
  void AddStats(cJSON* stats, uid_t caller);

  void set_frontend(Protocol protocol, Frontend frontend);
  bool has_frontend(Protocol protocol) const {
    return frontends_.count(static_cast<int>(protocol)) != 0;
  }

  // ---- For connections (plain sessions and frontends) ----
  loop::Loop* loop() const { return loop_; }
  const registry::Registry& registry() const { return *registry_; }
  const ProxyOptions& options() const { return options_; }
  Stats& stats() { return stats_; }
  PipePool* pipes() { return &pipes_; }
  ResolveCache* resolver() { return &resolver_; }
  // The edge-triggered set that plain sessions, dialers and relays register their sockets in.
  loop::Reactor* reactor() { return reactor_.get(); }

  // Checks `secret` for `job_id` against the live registry (constant time). A correct secret
  // is always admitted, throttled or not, and ends `conn`'s unauthenticated handshake. A
  // failure is counted against the job and against `conn`'s source, and answered kDenied, or
  // kBusy while either is throttled; each throttled episode is logged once. Returns the
  // target, or the error to answer with.
  struct Authorization {
    std::optional<ErrorCode> error;
    Target target;
  };
  Authorization Authorize(const std::string& job_id, const std::string& secret, Connection* conn);
  // The clock the throttle counts failures and lock-outs by, in ms: the loop's (loop::Loop::Now)
  // unless a test replaces it to move past a lock-out without waiting for one. Before any
  // handshake.
  using ThrottleClock = std::function<uint64_t()>;
  void set_throttle_clock_for_testing(ThrottleClock clock) { throttle_clock_ = std::move(clock); }
  // Counts a failed handshake that names no job (a bad preamble, a handshake timeout, an SSH
  // user name that is not a job id) against `conn`'s source; `what` is for the debug log.
  void RecordSourceFailure(Connection& conn, const char* what);
  // `conn` got past its handshake without a secret of ours (TLS passthrough to a live ssl job):
  // it no longer counts as an unauthenticated handshake.
  void EndHandshake(Connection* conn);
  // True while the job of `target` is still the record the target was taken from.
  bool StillCurrent(const Target& target) const;
  // The registry replaced or removed job `id`: tells every connection (SSH sessions close).
  void OnJobChanged(const std::string& id);

  // Told, on the loop thread, when a dial to the backend of job `job_id` (its record of
  // `generation`) connected, or was refused (Dialer::set_observer); not for other failures.
  // Must not call back into the proxy. The daemon feeds the broker's job states with it.
  using DialObserver =
      std::function<void(const std::string& job_id, uint64_t generation, bool connected)>;
  void set_dial_observer(DialObserver observer) { dial_observer_ = std::move(observer); }

  // Where backends may be (set up by Start() with the bound listeners).
  const BackendPolicy& backend_policy() const { return policy_; }
  // A Dialer for `target`'s backend that connects only to addresses the backend policy admits
  // for the job's owner, logging the first refusal (one line per dial, naming the job).
  std::unique_ptr<Dialer> NewDialer(const Target& target);
  // Starts connecting `conn` to its job's backend with a new Dialer kept in `*dialer`, under the
  // connect_timeout deadline. With `may_complete_inline`, see Dialer::Dial().
  void DialBackend(Connection* conn, const Target& target, std::unique_ptr<Dialer>* dialer,
                   Dialer::Callback cb, bool may_complete_inline = false);
  // Counts a failed dial to a backend and says what to answer: busy when the proxy itself is
  // out of file descriptors (its problem, not the backend's), unavailable otherwise.
  ErrorCode DialFailed(const Status& status);

  // Calls conn->OnDeadline() at `at_ms` (loop time) unless cleared or replaced first.
  void SetDeadline(Connection* conn, uint64_t at_ms);
  void ClearDeadline(Connection* conn);
  // The deadline `timeout_ms` from now; none (cleared) for 0, which means "no limit".
  void ArmDeadline(Connection* conn, int64_t timeout_ms);

  // Takes a connection created outside the accept path (a frontend's). Counts it as active.
  Connection* Adopt(std::unique_ptr<Connection> conn);
  // An SSH channel holds a backend socket like a connection does, so max_connections counts
  // channels too: a slot is taken before a channel is accepted (false: the proxy is full) and
  // returned when the channel ends.
  bool TakeChannelSlot();
  void ReturnChannelSlot();
  // A connection is done: it is destroyed on a later loop turn (never under its own callback).
  void Retire(Connection* conn);
  // Used by the sniffing Session to pass a TLS or SSH connection on: the socket, with what the
  // reactor knows of its readiness, goes to the frontend.
  // The new connection takes over `from`'s source and unauthenticated handshake.
  bool HandOff(Protocol protocol, loop::IoHandle client, Connection& from);

 private:
  Result<std::unique_ptr<Listener>> Listen(const HostPort& addr, int keepalive_s);
  // Tells the backend policy which addresses are the proxy's own.
  Status UpdateOwnListeners();
  void OnAccept(int fd, const sockaddr_storage& peer);
  // `conn`'s source, its owner looked up now if it was not yet (`fd`: its client socket, if
  // the connection does not hold it).
  const std::string& Source(Connection* conn, int fd = -1);
  // Looks up the owners of all the handshakes in progress not looked up yet.
  void LookUpHandshakeSources();
  // Counts `conn` as an unauthenticated handshake, and stops counting it.
  void StartHandshake(Connection* conn);
  void LogThrottled(const std::string& source_key);
  uint64_t ThrottleNow() const { return throttle_clock_ ? throttle_clock_() : loop_->Now(); }
  void OnDeadlineTimer();
  void RearmDeadlineTimer();
  void Sweep();

  loop::Loop* loop_;
  const registry::Registry* registry_;
  ProxyOptions options_;
  Stats stats_;
  Throttle throttle_;
  ThrottleClock throttle_clock_;  // empty: the loop's
  // Handshakes refused because the registry's view is too old, since the last log line about
  // them, and when that was (loop ms; 0: never): one line per 10 s at most.
  uint64_t stale_refusals_ = 0;
  uint64_t stale_logged_at_ = 0;
  PipePool pipes_;
  ResolveCache resolver_;
  BackendPolicy policy_;
  DialObserver dial_observer_;
  std::unique_ptr<loop::Reactor> reactor_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<HostPort> listener_specs_;             // what each of listeners_ was configured as
  std::vector<std::pair<HostPort, int>> inherited_;  // until Start()
  std::unordered_map<uint64_t, std::unique_ptr<Connection>> connections_;
  size_t channel_slots_ = 0;
  // Unauthenticated handshakes, oldest first (by id), and how many each source has.
  std::map<uint64_t, Connection*> handshakes_;
  std::unordered_map<std::string, int> handshakes_by_source_;
  size_t handshakes_unknown_ = 0;  // of handshakes_, those whose source_unknown_ is set
  // Retired connections, freed on a later loop turn: loop::DeleteSoon scoped to the Proxy, since
  // a connection refers to its Proxy to the end and so must not outlive it.
  std::vector<std::unique_ptr<Connection>> graveyard_;
  bool reap_scheduled_ = false;
  uint64_t next_id_ = 1;
  std::multimap<uint64_t, Connection*> deadlines_;
  loop::HandlePtr<loop::Timer> deadline_timer_;
  uint64_t deadline_timer_at_ = 0;
  loop::HandlePtr<loop::Timer> sweep_timer_;
  std::unordered_map<int, Frontend> frontends_;
  loop::Lifetime lifetime_;  // last
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_PROXY_H_
