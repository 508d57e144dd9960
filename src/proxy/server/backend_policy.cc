#include "proxy/server/backend_policy.h"

#include <ifaddrs.h>
#include <netinet/in.h>

#include <cstring>
#include <string>

#include "loop/sock_diag.h"
#include "loop/stream.h"

namespace brokerproxy::proxy {
namespace {

// Interface addresses change rarely (DHCP, a new VPN); a few seconds of staleness is harmless
// and spares a netlink dump per connection.
constexpr auto kInterfaceCacheTtl = std::chrono::seconds(5);

// `a` with IPv4-mapped IPv6 turned into IPv4 and the port kept.
sockaddr_storage Normalized(const sockaddr_storage& a) {
  if (a.ss_family != AF_INET6) return a;
  const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&a);
  if (!IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) return a;
  sockaddr_storage out{};
  auto* in = reinterpret_cast<sockaddr_in*>(&out);
  in->sin_family = AF_INET;
  in->sin_port = in6->sin6_port;
  std::memcpy(&in->sin_addr, &in6->sin6_addr.s6_addr[12], 4);
  return out;
}

int PortOf(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&a)->sin_port);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&a)->sin6_port);
  return 0;
}

// Same family and address bytes (ports ignored); both normalized.
bool SameHost(const sockaddr_storage& a, const sockaddr_storage& b) {
  if (a.ss_family != b.ss_family) return false;
  if (a.ss_family == AF_INET) {
    return std::memcmp(&reinterpret_cast<const sockaddr_in*>(&a)->sin_addr,
                       &reinterpret_cast<const sockaddr_in*>(&b)->sin_addr, 4) == 0;
  }
  return std::memcmp(&reinterpret_cast<const sockaddr_in6*>(&a)->sin6_addr,
                     &reinterpret_cast<const sockaddr_in6*>(&b)->sin6_addr, 16) == 0;
}

bool IsUnspecified(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) {
    return reinterpret_cast<const sockaddr_in*>(&a)->sin_addr.s_addr == htonl(INADDR_ANY);
  }
  return a.ss_family == AF_INET6 &&
         IN6_IS_ADDR_UNSPECIFIED(&reinterpret_cast<const sockaddr_in6*>(&a)->sin6_addr);
}

std::string Show(const sockaddr_storage& a) {
  return loop::FormatAddress(reinterpret_cast<const sockaddr*>(&a));
}

}  // namespace

bool BackendPolicy::IsLocal(const sockaddr_storage& addr) const {
  sockaddr_storage a = Normalized(addr);
  if (IsLoopback(a) || IsUnspecified(a)) return true;
  auto now = std::chrono::steady_clock::now();
  if (interfaces_.empty() || now - interfaces_at_ > kInterfaceCacheTtl) {
    ifaddrs* list = nullptr;
    if (::getifaddrs(&list) == 0) {
      interfaces_.clear();
      for (ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
        if (i->ifa_addr == nullptr) continue;
        int family = i->ifa_addr->sa_family;
        if (family != AF_INET && family != AF_INET6) continue;
        sockaddr_storage s{};
        std::memcpy(&s, i->ifa_addr,
                    family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6));
        interfaces_.push_back(Normalized(s));
      }
      ::freeifaddrs(list);
      interfaces_at_ = now;
    }
    // If getifaddrs failed, the previous list stays: failing closed would need one, and an
    // empty list would let this node's addresses pass as another host's.
  }
  for (const sockaddr_storage& i : interfaces_) {
    if (SameHost(i, a)) return true;
  }
  return false;
}

Status BackendPolicy::CheckAddress(const sockaddr_storage& addr) const {
  sockaddr_storage a = Normalized(addr);
  if (a.ss_family != AF_INET && a.ss_family != AF_INET6) {
    return Status::PermissionDenied("backend address is not IPv4 or IPv6");
  }
  std::string host = Show(a);
  if (IsUnspecified(a)) {
    return Status::PermissionDenied("backend address " + host + " names no host");
  }
  int port = PortOf(a);
  bool local = IsLocal(a);
  if (port != 0) {
    for (const sockaddr_storage& raw : listeners_) {
      sockaddr_storage l = Normalized(raw);
      if (PortOf(l) != port) continue;
      if (IsUnspecified(l) ? local : SameHost(l, a)) {
        return Status::PermissionDenied("backend " + host + " is the proxy's own port");
      }
    }
  }
  if (local) return Status::OK();  // the owner check at dial governs this node's addresses
  if (allow_ && !MatchesAny(*allow_, reinterpret_cast<const sockaddr*>(&a))) {
    return Status::PermissionDenied("backend " + host +
                                    " is outside the networks the broker connects to "
                                    "([registry] backend_allow)");
  }
  return Status::OK();
}

Status BackendPolicy::CheckDial(const sockaddr_storage& addr, uid_t owner) const {
  BP_RETURN_IF_ERROR(CheckAddress(addr));
  if (owner == 0 || !IsLocal(addr)) return Status::OK();
  sockaddr_storage a = Normalized(addr);
  auto listener = loop::TcpListenerOwner(reinterpret_cast<const sockaddr*>(&a));
  if (!listener.ok()) return listener.status();
  if (*listener != owner) {
    return Status::PermissionDenied("the listener on " + Show(a) + " belongs to uid " +
                                    std::to_string(*listener) + ", not to the job's owner (uid " +
                                    std::to_string(owner) + ")");
  }
  return Status::OK();
}

}  // namespace brokerproxy::proxy
