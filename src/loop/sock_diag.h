// Who owns a local TCP socket: NETLINK_SOCK_DIAG (inet_diag) queries, IPv4 and IPv6.
//
// The kernel records in every socket the uid that created it, and reports it to any local
// process. That answers two questions a daemon shared by many users must ask before it lets
// bytes through for one of them:
//   - TcpListenerOwner: whose service would receive a connection made to a local address and
//     port (before the daemon connects there on a user's behalf);
//   - TcpPeerOwner: whose socket is at the other end of a loopback connection that was accepted
//     (before a per-user listener serves it).
//
// Each call sends one request on its thread's netlink socket (opened on the thread's first query
// and kept: a daemon asks at every connection from a local address) and reads the answer with a
// receive timeout, so it blocks for at most about a second even if the kernel never answered; in
// practice the kernel answers within the send. The listener query asks only for listening
// sockets on the one port (an inet_diag bytecode filter), not for every socket of the host.
// Unprivileged callers may use both.
//
// The answer describes the moment of the query: a socket may close and another take its place
// right after. Callers that act on it shortly afterwards accept that window.
//
// Thread-safe (a socket per thread, nothing else shared); blocking, so on an event loop only where
// a short syscall is acceptable.

#ifndef BROKERPROXY_LOOP_SOCK_DIAG_H_
#define BROKERPROXY_LOOP_SOCK_DIAG_H_

#include <sys/socket.h>
#include <sys/types.h>

#include "loop/status.h"

namespace brokerproxy::loop {

// The uid owning the TCP socket that listens for connections to `local` (an AF_INET or AF_INET6
// address with its port; IPv4-mapped IPv6 addresses are taken as IPv4). As the kernel picks: a
// listener bound to exactly that address wins over one bound to its family's wildcard address
// (an IPv6 wildcard listener without IPV6_V6ONLY also takes IPv4 connections, and an IPv6
// listener on ::ffff:a.b.c.d takes those to a.b.c.d). Errors: NotFound if nothing listens there;
// PermissionDenied if listeners of different users share the winning address (SO_REUSEPORT
// groups are per user, so only a socket on a different device binding could cause that);
// InvalidArgument for another address family; IOError or Timeout if the kernel could not be
// asked.
Result<uid_t> TcpListenerOwner(const sockaddr* local);

// The uid owning the TCP socket whose own end is `local` and whose peer is `remote` (both
// AF_INET or AF_INET6 with ports, IPv4-mapped taken as IPv4): for a connection accepted from a
// local address, pass the accepted socket's peer address as `local` and its own address as
// `remote`. One exact lookup by the 4-tuple. Errors: NotFound if no such socket exists here
// (e.g. the peer is on another host), or if all that is left of it is the remnant of a closed
// socket (which names no owner: the kernel says uid 0); otherwise as TcpListenerOwner.
Result<uid_t> TcpPeerOwner(const sockaddr* local, const sockaddr* remote);

// Opens the calling thread's netlink socket now, if it is not open yet: a daemon calls it at
// start, so that the descriptor is taken then, not by whichever connection asks first.
Status OpenSockDiag();

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_SOCK_DIAG_H_
