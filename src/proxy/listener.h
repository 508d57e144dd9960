// Listener: one listening TCP socket of the proxy port, accepting with accept4() from a
// uv_poll so accepted sockets arrive as raw non-blocking fds (sniffing peeks at them and the
// relay splices them; libuv's uv_tcp_t would own them instead).
//
// Backlog SOMAXCONN (a short backlog turned socat's p99 latency into a second). When the process
// runs out of file descriptors (EMFILE/ENFILE) accepting pauses for a second instead of
// spinning on a readable socket it cannot accept from; each pause is counted and logged once.
//
// Ownership: the Proxy owns its Listeners; `*loop` must outlive them. Loop-thread only.

#ifndef BROKERPROXY_PROXY_LISTENER_H_
#define BROKERPROXY_PROXY_LISTENER_H_

#include <sys/socket.h>

#include <functional>
#include <memory>
#include <string>

#include "loop/address.h"
#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/poll.h"
#include "loop/timer.h"

namespace brokerproxy::proxy {

class Listener {
 public:
  // A new connection: `fd` is non-blocking and close-on-exec, and now the callee's.
  using AcceptCallback = std::function<void(int fd, const sockaddr_storage& peer)>;
  // Called when accepting pauses for lack of fds.
  using PauseCallback = std::function<void()>;

  // Binds `address` (a numeric address, "localhost", "*" for every IPv4 address or "::" for
  // IPv6; port 0 picks a free port) and listens. TCP_NODELAY and keepalive (`keepalive_s` idle
  // seconds, 0 = off) are set on the listening socket, which Linux copies to every accepted
  // one: no per-connection setsockopt().
  static Result<std::unique_ptr<Listener>> Create(loop::Loop* loop, const HostPort& address,
                                                  int keepalive_s, AcceptCallback on_accept,
                                                  PauseCallback on_pause);

  // The bound address, with the real port ("127.0.0.1:7000", "[::1]:7000").
  const std::string& address() const { return address_; }
  int port() const { return port_; }

 private:
  Listener(loop::Loop* loop, AcceptCallback on_accept, PauseCallback on_pause)
      : loop_(loop), on_accept_(std::move(on_accept)), on_pause_(std::move(on_pause)) {}
  void OnReadable();

  loop::Loop* loop_;
  AcceptCallback on_accept_;
  PauseCallback on_pause_;
  loop::HandlePtr<loop::Poll> poll_;
  loop::HandlePtr<loop::Timer> resume_;
  std::string address_;
  int port_ = 0;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_LISTENER_H_
