// BackendPolicy: where the daemon may connect on behalf of a job's owner.
//
// The daemon connects to whatever host:port a user registers, with its own reach: it runs as
// root on a node shared by many users, and the proxy port lets anyone who knows a job (or, for
// SNI passthrough, anyone at all) send bytes there. Without limits a user could aim a job at a
// service only root may reach, at another user's unauthenticated local service, or at the
// proxy's own port. So, for every resolved address, before any connection is made:
//   - an address of this node itself (loopback, the unspecified address, or any address of its
//     interfaces, getifaddrs) is dialled only if the socket listening there belongs to the job's
//     owner (loop/sock_diag.h); jobs of uid 0 are exempt;
//   - the proxy's own listeners never are;
//   - any other host only inside `allow` (`[registry] backend_allow`).
// CheckAddress() holds what can be checked before the service listens (at save);
// CheckDial() adds the owner check (at every dial and readiness probe).
//
// Loop-thread only (the interface addresses are cached for a few seconds).

#ifndef BROKERPROXY_PROXY_SERVER_BACKEND_POLICY_H_
#define BROKERPROXY_PROXY_SERVER_BACKEND_POLICY_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <chrono>
#include <optional>
#include <vector>

#include "loop/address.h"
#include "loop/status.h"

namespace brokerproxy::proxy {

class BackendPolicy {
 public:
  // `allow`: the networks of other hosts that backends may be on; nullopt: every other host.
  explicit BackendPolicy(std::optional<std::vector<Cidr>> allow = std::nullopt)
      : allow_(std::move(allow)) {}

  // The addresses the proxy listens on (with their ports), which are never a backend.
  void set_own_listeners(std::vector<sockaddr_storage> listeners) {
    listeners_ = std::move(listeners);
  }

  // The checks that do not depend on who listens: not the unspecified address (0.0.0.0, ::),
  // not one of the proxy's listeners (skipped if `addr` has port 0, i.e. not known yet), and for
  // other hosts, inside `allow`. PermissionDenied with a message for the user otherwise.
  Status CheckAddress(const sockaddr_storage& addr) const;
  // CheckAddress(), and for an address of this node: the listener there belongs to `owner`
  // (uid 0: any). PermissionDenied (or NotFound if nothing listens) otherwise.
  Status CheckDial(const sockaddr_storage& addr, uid_t owner) const;

  // True if a connection to `addr` stays on this node: loopback, unspecified, or an address of
  // one of its interfaces.
  bool IsLocal(const sockaddr_storage& addr) const;

 private:
  std::optional<std::vector<Cidr>> allow_;
  std::vector<sockaddr_storage> listeners_;
  mutable std::vector<sockaddr_storage> interfaces_;  // with port 0
  mutable std::chrono::steady_clock::time_point interfaces_at_{};
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_BACKEND_POLICY_H_
