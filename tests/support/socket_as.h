// TCP sockets owned by another user, made inside the (root) test process.
//
// The kernel records as a socket's owner the file-system uid of the thread that created it.
// setfsuid() changes that for the calling thread only, so a test can create "bob's" listener
// without a child process, and other threads are not affected.

#ifndef BROKERPROXY_TESTS_SUPPORT_SOCKET_AS_H_
#define BROKERPROXY_TESTS_SUPPORT_SOCKET_AS_H_

#include <netinet/in.h>
#include <sys/fsuid.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "loop/work.h"

namespace brokerproxy::testing {

// A TCP socket of `family` owned by `uid`; -1 on failure.
inline int SocketAs(uid_t uid, int family) {
  int old = ::setfsuid(uid);
  int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ::setfsuid(old);
  return fd;
}

// A socket owned by `uid` listening on host:port (port 0: the kernel picks; read it back with
// BoundPort). `v6only` applies to IPv6 sockets. -1 on failure.
inline int ListenAs(uid_t uid, const std::string& host, int port, bool v6only = false) {
  auto addr = loop::ParseNumericAddress(host, port);
  if (!addr) return -1;
  int fd = SocketAs(uid, addr->ss_family);
  if (fd < 0) return -1;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (addr->ss_family == AF_INET6) {
    int v = v6only ? 1 : 0;
    ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof(v));
  }
  socklen_t len = addr->ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&*addr), len) != 0 || ::listen(fd, 16) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// The local port of a bound socket, 0 on failure.
inline int BoundPort(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return 0;
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return 0;
}

}  // namespace brokerproxy::testing

#endif  // BROKERPROXY_TESTS_SUPPORT_SOCKET_AS_H_
