// Listener: one listening TCP socket of the proxy port, registered in the Reactor like every
// socket the proxy moves bytes on, accepting with accept4() so accepted sockets arrive as raw
// non-blocking fds (sniffing peeks at them and the relay splices them; libuv's uv_tcp_t would
// own them instead).
//
// The reactor is edge-triggered: one edge may stand for many waiting connections. Each turn
// accepts at most kAcceptBatch of them, then yields to the rest of the loop and comes back
// without a new edge; it stops only at EAGAIN.
//
// Backlog SOMAXCONN (a short backlog turned socat's p99 latency into a second). When the process
// runs out of file descriptors (EMFILE), a spare descriptor held for the purpose is given up for
// a moment so that the waiting client can be accepted, told `overload_reply` (the proxy's
// "ERR busy") and closed, instead of hanging in the backlog; if even that fails (ENFILE, no
// memory), accepting pauses for a second rather than spinning on a readable socket it cannot
// accept from. Each refusal and pause is counted through `on_overload` and logged once per
// episode.
//
// Ownership: the Proxy owns its Listeners; `*reactor` must outlive them. Loop-thread only.

#ifndef BROKERPROXY_PROXY_SERVER_LISTENER_H_
#define BROKERPROXY_PROXY_SERVER_LISTENER_H_

#include <sys/socket.h>

#include <functional>
#include <memory>
#include <string>

#include "loop/address.h"
#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/reactor.h"
#include "loop/timer.h"

namespace brokerproxy::proxy {

// A non-blocking, close-on-exec TCP socket bound to `address` (as Listener::Create takes it) and
// listening with backlog SOMAXCONN; the caller owns the fd. With `keepalive_s` >= 0 the socket is
// tuned first (TuneTcpSocket), so that every connection it accepts inherits the options. Blocks
// on a name lookup.
Result<int> OpenListeningSocket(const HostPort& address, int keepalive_s = -1);

class Listener {
 public:
  // A new connection: `fd` is non-blocking and close-on-exec, and now the callee's.
  using AcceptCallback = std::function<void(int fd, const sockaddr_storage& peer)>;
  // Called for each connection refused, or pause taken, for lack of fds.
  using OverloadCallback = std::function<void()>;

  // Binds `address` (a numeric address, "localhost", "*" for every IPv4 address or "::" for
  // IPv6; port 0 picks a free port) and listens. TCP_NODELAY and keepalive (`keepalive_s` idle
  // seconds, 0 = off) are set on the listening socket, which Linux copies to every accepted
  // one: no per-connection setsockopt().
  static Result<std::unique_ptr<Listener>> Create(loop::Reactor* reactor, const HostPort& address,
                                                  int keepalive_s, AcceptCallback on_accept,
                                                  OverloadCallback on_overload = nullptr,
                                                  std::string overload_reply = "");
  // The same over `fd`, a listening TCP socket this process was handed (an upgrade: the old
  // process passed it on). The listener owns it from here, also on failure.
  static Result<std::unique_ptr<Listener>> Adopt(loop::Reactor* reactor, int fd, int keepalive_s,
                                                 AcceptCallback on_accept,
                                                 OverloadCallback on_overload = nullptr,
                                                 std::string overload_reply = "");
  ~Listener();

  // The listening socket (for handing it to a new process: dup it).
  int fd() const { return io_.fd(); }

  // Connections accepted per turn before the rest of the loop gets one.
  static constexpr int kAcceptBatch = 64;

  // Keepalive for the connections accepted from now on (0: off); see Create().
  void SetKeepalive(int keepalive_s);

  // The bound address, with the real port ("127.0.0.1:7000", "[::1]:7000").
  const std::string& address() const { return address_; }
  int port() const { return port_; }

 private:
  Listener(AcceptCallback on_accept, OverloadCallback on_overload, std::string overload_reply)
      : on_accept_(std::move(on_accept)),
        on_overload_(std::move(on_overload)),
        overload_reply_(std::move(overload_reply)) {}
  void OnReady(loop::IoWatch* w);
  // Out of fds: accepts one connection in the spare fd's place and turns it away. Returns the
  // errno of that accept (0 if one was refused), or EMFILE if no spare fd is left.
  int RefuseOne();

  AcceptCallback on_accept_;
  OverloadCallback on_overload_;
  std::string overload_reply_;
  int spare_fd_ = -1;        // /dev/null, held so that one fd can always be freed
  bool overloaded_ = false;  // within an episode: log once
  bool paused_ = false;      // no fds: accepting waits for `resume_`
  loop::IoHandle io_;
  loop::HandlePtr<loop::Timer> resume_;
  std::string address_;
  int port_ = 0;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_LISTENER_H_
