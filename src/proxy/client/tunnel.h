// The laptop side of a tunnel: how `brokerproxy connect` carries one local connection to a job.
//
// A ProxyPath opens, per local connection, a way to the proxy port (direct TCP here; TLS and
// an SSH direct-tcpip channel through the login node in their own modules), speaks the BROKER1
// handshake on it and then relays bytes between the local side and the job's backend.
//
// Ownership: `connect` owns the path and every Tunnel; dropping a Tunnel closes both its ends.
// The done callback runs at most once, never inside Open(), and the Tunnel may be destroyed
// from inside it. Loop-thread only.

#ifndef BROKERPROXY_PROXY_CLIENT_TUNNEL_H_
#define BROKERPROXY_PROXY_CLIENT_TUNNEL_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/reactor.h"
#include "loop/status.h"
#include "loop/timer.h"
#include "proxy/ssh/ssh_common.h"
#include "proxy/transport/dialer.h"
#include "proxy/transport/relay.h"
#include "proxy/wire/broker1.h"

namespace brokerproxy::proxy::client {

// What a tunnel that the proxy refused with "ERR denied" or "ERR busy" gives back: the local side,
// still open, and every byte read from it so far (sent to the proxy, which dropped them), so that
// the connection can be tried once more with another secret.
struct Refused {
  proxy::Relay::Side local;
  std::string early;
};

class Tunnel {
 public:
  virtual ~Tunnel() = default;
  // After the done callback reported a refusal worth re-fetching the secret for
  // (proxy::WorthRefetchingSecret): the local side and its bytes.
  // nullopt after any other end, and on a second call.
  std::optional<Refused> TakeRefused() { return std::exchange(refused_, std::nullopt); }

 protected:
  std::optional<Refused> refused_;
};

class ProxyPath {
 public:
  // OK when both directions finished; else why the tunnel failed or ended.
  using Done = std::function<void(Status)>;
  virtual ~ProxyPath() = default;
  // Starts a tunnel for the local endpoint `local`. `replay`: bytes already read from it (a
  // retry after Tunnel::TakeRefused), sent first.
  virtual std::unique_ptr<Tunnel> Open(proxy::Relay::Side local, std::string replay, Done done) = 0;
  // The secret for tunnels opened from now on (the job was saved again).
  virtual void SetSecret(std::string secret) = 0;
  // "127.0.0.1:7000", "TLS to login:7000", "login via SSH", for messages.
  virtual std::string Describe() const = 0;
};

// A timer that calls `fail` with a Timeout naming `what` once the handshake took `timeout_ms`.
// (A timer cannot fail to initialise; without one the proxy's own deadline still applies.)
loop::HandlePtr<loop::Timer> HandshakeTimer(loop::Loop& loop, int64_t timeout_ms,
                                            const std::string& what,
                                            std::function<void(Status)> fail);

// Where and as whom a path reaches the proxy port: shared by the direct and the TLS paths.
struct ProxyEndpoint {
  ProxyEndpoint(loop::Reactor* reactor, std::string host, int port, std::string job,
                std::string secret, int64_t handshake_timeout_ms);
  // "host:port", "[v6]:port".
  std::string Address() const;
  // How a tunnel sets out for the proxy: starts its handshake deadline (HandshakeTimer: `fail`
  // with a Timeout naming `what`) and dials the proxy with `dialer`; `connected` gets the
  // socket, tuned for a tunnel, or `fail` is told that the proxy cannot be reached. Returns the
  // deadline's timer, which the tunnel keeps until its handshake is done. Neither callback runs
  // inside Reach().
  loop::HandlePtr<loop::Timer> Reach(proxy::Dialer* dialer, const std::string& what,
                                     std::function<void(Status)> fail,
                                     std::function<void(loop::IoHandle)> connected);

  loop::Loop* loop;
  loop::Reactor* reactor;
  proxy::ResolveCache resolver;
  std::string host;
  int port;
  std::string job;
  std::string secret;
  int64_t timeout_ms;
};

// What a local client sends before the proxy's "OK": read while the tunnel waits for the reply
// and sent right behind the preamble, so a client that speaks first (a browser, an ssh client's
// banner) loses no round trip. The proxy keeps these bytes in order for the backend, and drops
// them if it refuses. At most kMax bytes per tunnel. The local side's EOF is not consumed: a
// socket or a pipe reports it again to the relay that takes over (a terminal would not, so one
// is left alone).
//
// Ownership: watches the reactor fd of a Relay::Side the tunnel owns; Stop() before the side
// moves on (to a relay, or out of the reactor). Loop-thread only.
class EarlyBytes {
 public:
  static constexpr size_t kMax = 64 * 1024;
  // Takes bytes to send; returns how many it took (0 when it cannot take any now).
  using Sink = std::function<size_t(std::string_view)>;

  // Bytes read from the local side by an earlier tunnel (`replay`), offered first. Call before
  // Watch(). They count against kMax.
  void Preload(std::string replay);
  // Starts watching `side` (its read fd is registered in the reactor); `wake` runs when it may
  // have bytes, and should call Pump().
  void Watch(proxy::Relay::Side& side, std::function<void()> wake);
  // Reads what has arrived, within the budget, and offers it to `sink`. Reading pauses while
  // the sink leaves bytes over. Not OK if reading the local side failed.
  // REQUIRES: `sink` does not call Stop().
  Status Pump(const Sink& sink);
  // Stops watching; returns the bytes read that the sink has not taken, which go first.
  std::string Stop();
  // Stops watching; returns every byte read, taken by the sink or not (for a retry).
  std::string StopAndReplay();

 private:
  loop::IoWatch* watch_ = nullptr;  // null: not watching
  std::string pending_;
  std::string sent_;  // what the sink took, kept for StopAndReplay()
  size_t budget_ = kMax;
};

// The client's side of the BROKER1 handshake (proxy/wire/broker1.h), whatever carries its bytes
// (a TCP socket, TLS, an SSH channel; the tunnel moves them):
//
//   send Preamble() --> pipeline the local client's first bytes behind it (early())
//     --> Feed() what the proxy sends until done() --> Conclude():
//        OK            -> relay; the early bytes not sent yet go first, and what followed the
//                         reply line (the backend's first bytes) was never fed, so the tunnel
//                         still has it
//        denied, busy  -> the error, and Refused: the local side and every byte read from it,
//                         for a retry with the secret fetched anew
//        anything else -> the error (a reply line too long, or no reply, too)
//
// Loop-thread only, like EarlyBytes.
class ClientHandshake {
 public:
  // `replay`: bytes an earlier tunnel read from the local side (EarlyBytes::Preload).
  ClientHandshake(std::string job, std::string replay);
  // The preamble line with `secret` (the path's at the time it is sent), sent first, whole,
  // before any early byte. Holds the secret: never logged.
  std::string Preamble(std::string_view secret) const {
    return proxy::EncodePreamble(job_, secret);
  }
  EarlyBytes& early() { return early_; }
  // Takes bytes the proxy sent after the preamble went out and returns how many of them are
  // the reply line's: the rest (after the newline) is the backend's, the caller keeps it. 0 once
  // done().
  size_t Feed(std::string_view from_proxy);
  // The reply line is complete (or over its bound).
  bool done() const { return reply_.state() != proxy::ReplyReader::State::kNeedMore; }
  // REQUIRES done(). OK when the proxy said OK; then `*unsent` holds the early bytes not sent
  // yet. Otherwise the reply's error, and for a refusal worth re-fetching the secret
  // (proxy::WorthRefetchingSecret) `*refused` takes `local` and every byte read from it.
  // Stops watching the local side in either case.
  Status Conclude(proxy::Relay::Side& local, std::string* unsent, std::optional<Refused>* refused);
  // Stops watching the local side (the tunnel ends).
  void Stop() { early_.Stop(); }

 private:
  std::string job_;
  EarlyBytes early_;
  proxy::ReplyReader reply_;
};

// Plain TCP straight to the proxy port (on this machine, or reachable from it, e.g. through an
// `ssh -L` the user set up).
std::unique_ptr<ProxyPath> NewDirectPath(loop::Reactor* reactor, proxy::PipePool* pipes,
                                         std::string host, int port, std::string job,
                                         std::string secret, int64_t handshake_timeout_ms);

// Through the login node (ssh_tunnel.cc): `session` is connected and authenticated
// (ssh_client.h); it becomes nonblocking and is driven on `reactor`. Each tunnel is a direct-tcpip
// channel to `host`:`port` as the login node sees it (the proxy port on its loopback). `via`
// names the login node in messages. `on_lost` runs once if the SSH session fails (every open
// tunnel has ended then, and no new one can start); it may destroy the path.
Result<std::unique_ptr<ProxyPath>> NewSshPath(loop::Reactor* reactor, proxy::SshSessionPtr session,
                                              std::string via, std::string host, int port,
                                              std::string job, std::string secret,
                                              int64_t handshake_timeout_ms,
                                              std::function<void(Status)> on_lost);

}  // namespace brokerproxy::proxy::client

#endif  // BROKERPROXY_PROXY_CLIENT_TUNNEL_H_
