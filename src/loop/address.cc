#include "loop/address.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <charconv>
#include <cstring>
#include <limits>

#include "loop/sock_diag.h"

namespace brokerproxy {
namespace {

constexpr std::string_view kBlanks = " \t";

std::string_view Trim(std::string_view s) {
  size_t b = s.find_first_not_of(kBlanks);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(kBlanks) - b + 1);
}

bool AllDigits(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

// Parses a decimal without sign or blanks into `*out`; false on garbage or overflow.
template <typename T>
bool ParseDecimal(std::string_view s, T* out) {
  if (!AllDigits(s)) return false;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && end == s.data() + s.size();
}

// Quotes user text for an error message, cut short so a huge value cannot flood the log.
std::string Quote(std::string_view s) {
  constexpr size_t kMax = 80;
  if (s.size() > kMax) return "'" + std::string(s.substr(0, kMax)) + "...'";
  return "'" + std::string(s) + "'";
}

Status ParsePort(std::string_view text, std::string_view whole, bool allow_zero, int* port) {
  if (text.size() > 5 || !ParseDecimal(text, port) || *port > 65535) {
    return Status::InvalidArgument(Quote(whole) + ": port " + Quote(text) +
                                   " is not a number from 1 to 65535");
  }
  if (*port == 0 && !allow_zero) {
    return Status::InvalidArgument(Quote(whole) + ": port 0 is not allowed here");
  }
  return Status::OK();
}

bool ValidHostName(std::string_view host) {
  if (host.empty() || host.size() > 253) return false;
  for (char c : host) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == '_';
    if (!ok) return false;
  }
  return true;
}

// The network bits of byte `i` of an address under a `prefix`-bit mask.
unsigned char PrefixMask(int prefix, int i) {
  int keep = prefix - 8 * i;
  if (keep >= 8) return 0xff;
  if (keep <= 0) return 0;
  return static_cast<unsigned char>(0xff << (8 - keep));
}

bool IsIpv6Literal(std::string_view host) {
  if (host.size() >= INET6_ADDRSTRLEN) return false;
  std::string copy(host);
  in6_addr addr;
  return inet_pton(AF_INET6, copy.c_str(), &addr) == 1;
}

}  // namespace

std::string HostPort::ToString() const {
  std::string p = std::to_string(port);
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + p;
  return host + ":" + p;
}

Result<HostPort> ParseHostPort(std::string_view text, std::optional<int> default_port,
                               std::string_view default_host, bool allow_zero) {
  if (text.empty()) return Status::InvalidArgument("empty address; expected host:port");
  // A NUL would end the host early for every C function it reaches (inet_pton, getaddrinfo).
  if (text.find('\0') != std::string_view::npos) {
    return Status::InvalidArgument("the address contains a NUL byte");
  }
  HostPort hp;
  std::string_view port_text;  // empty: no port given
  bool has_port = false;
  if (text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos) {
      return Status::InvalidArgument(Quote(text) + ": unbalanced '['");
    }
    std::string_view inner = text.substr(1, close - 1);
    std::string_view rest = text.substr(close + 1);
    if (!IsIpv6Literal(inner)) {
      return Status::InvalidArgument(Quote(text) + ": " + Quote(inner) +
                                     " in brackets is not an IPv6 address");
    }
    hp.host = std::string(inner);
    if (!rest.empty()) {
      if (rest.front() != ':') {
        return Status::InvalidArgument(Quote(text) + ": expected ':port' after ']'");
      }
      has_port = true;
      port_text = rest.substr(1);
    }
  } else if (text.find(']') != std::string_view::npos) {
    return Status::InvalidArgument(Quote(text) + ": unbalanced ']'");
  } else {
    size_t colon = text.find(':');
    if (colon != std::string_view::npos && text.find(':', colon + 1) != std::string_view::npos) {
      // Without brackets "2001:db8::1:7000" is ambiguous, so every unbracketed IPv6 form is
      // refused, including a bare address that could take the default port.
      return Status::InvalidArgument(Quote(text) +
                                     ": an IPv6 address needs brackets, e.g. [::1]:7000");
    }
    if (colon != std::string_view::npos) {
      hp.host = std::string(text.substr(0, colon));
      has_port = true;
      port_text = text.substr(colon + 1);
    } else if (default_port && AllDigits(text)) {
      hp.host = std::string(default_host);  // the caller's, not checked
      has_port = true;
      port_text = text;
    } else {
      hp.host = std::string(text);
    }
    std::string_view host = text.substr(0, colon);
    if (host.empty()) return Status::InvalidArgument(Quote(text) + ": empty host");
    if (!ValidHostName(host)) {
      return Status::InvalidArgument(Quote(text) + ": " + Quote(host) +
                                     " is not a valid host name or IPv4 address");
    }
  }
  if (has_port) {
    BP_RETURN_IF_ERROR(ParsePort(port_text, text, allow_zero, &hp.port));
  } else if (default_port) {
    hp.port = *default_port;
  } else {
    return Status::InvalidArgument(Quote(text) + ": missing port; expected host:port");
  }
  return hp;
}

Result<std::vector<std::string>> SplitList(std::string_view text) {
  std::vector<std::string> items;
  if (Trim(text).empty()) return items;  // the empty list
  std::string_view rest = text;
  while (true) {
    size_t comma = rest.find(',');
    std::string_view item = Trim(rest.substr(0, comma));
    if (item.empty()) return Status::InvalidArgument("empty item in list " + Quote(text));
    items.emplace_back(item);
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  return items;
}

// Host bits below the prefix must be zero: "10.1.2.3/8" is refused rather than silently
// widened, since in an allow-list it is more likely a typo than an intent.
Result<Cidr> Cidr::Parse(std::string_view text) {
  if (text.find('\0') != std::string_view::npos) {
    return Status::InvalidArgument("the network contains a NUL byte");
  }
  size_t slash = text.find('/');
  std::string addr(text.substr(0, slash));
  if (addr.empty()) return Status::InvalidArgument(Quote(text) + ": missing address");
  Cidr net;
  net.family_ = addr.find(':') != std::string::npos ? AF_INET6 : AF_INET;
  int bits = net.family_ == AF_INET ? 32 : 128;
  if (addr.size() >= INET6_ADDRSTRLEN || inet_pton(net.family_, addr.c_str(), net.bytes_) != 1) {
    return Status::InvalidArgument(Quote(text) + ": " + Quote(addr) +
                                   " is not an IPv4 or IPv6 address");
  }
  net.prefix_ = bits;
  if (slash != std::string_view::npos) {
    std::string_view p = text.substr(slash + 1);
    if (p.size() > 3 || !ParseDecimal(p, &net.prefix_) || net.prefix_ > bits) {
      return Status::InvalidArgument(Quote(text) + ": prefix length " + Quote(p) +
                                     " is not a number from 0 to " + std::to_string(bits));
    }
  }
  bool host_bits = false;
  for (int i = 0; i < bits / 8; ++i) {
    unsigned char mask = PrefixMask(net.prefix_, i);
    host_bits |= (net.bytes_[i] & ~mask) != 0;
    net.bytes_[i] &= mask;
  }
  if (host_bits) {
    return Status::InvalidArgument(Quote(text) + ": host bits are set below the /" +
                                   std::to_string(net.prefix_) + " prefix; did you mean " +
                                   net.ToString() + "?");
  }
  // An IPv4-mapped network (::ffff:a.b.c.d/96+) is stored as the IPv4 network it names, so
  // it matches IPv4 clients as well as mapped ones.
  static constexpr unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (net.family_ == AF_INET6 && net.prefix_ >= 96 && std::memcmp(net.bytes_, kMapped, 12) == 0) {
    std::memmove(net.bytes_, net.bytes_ + 12, 4);
    std::memset(net.bytes_ + 4, 0, 12);
    net.family_ = AF_INET;
    net.prefix_ -= 96;
  }
  return net;
}

bool Cidr::Contains(const sockaddr* addr) const {
  if (addr == nullptr) return false;
  const unsigned char* bytes = nullptr;
  if (addr->sa_family == AF_INET && family_ == AF_INET) {
    bytes = reinterpret_cast<const unsigned char*>(
        &reinterpret_cast<const sockaddr_in*>(addr)->sin_addr);
  } else if (addr->sa_family == AF_INET6) {
    const in6_addr* a6 = &reinterpret_cast<const sockaddr_in6*>(addr)->sin6_addr;
    if (family_ == AF_INET6) {
      bytes = a6->s6_addr;
    } else if (IN6_IS_ADDR_V4MAPPED(a6)) {
      bytes = a6->s6_addr + 12;
    }
  }
  if (bytes == nullptr) return false;
  for (int i = 0; i < 16 && 8 * i < prefix_; ++i) {
    unsigned char mask = PrefixMask(prefix_, i);
    if ((bytes[i] & mask) != bytes_[i]) return false;
  }
  return true;
}

std::string Cidr::ToString() const {
  char buf[INET6_ADDRSTRLEN];
  if (inet_ntop(family_, bytes_, buf, sizeof(buf)) == nullptr) return "?";
  return std::string(buf) + "/" + std::to_string(prefix_);
}

bool MatchesAny(const std::vector<Cidr>& nets, const sockaddr* addr) {
  for (const Cidr& net : nets) {
    if (net.Contains(addr)) return true;
  }
  return false;
}

namespace {

struct Unit {
  std::string_view suffix;
  int64_t ms;
};
// Largest first, so FormatDuration picks the largest exact unit.
constexpr Unit kUnits[] = {{"d", 86400000}, {"h", 3600000}, {"m", 60000}, {"s", 1000}, {"ms", 1}};

}  // namespace

Result<int64_t> ParseDuration(std::string_view text) {
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  std::string_view number = text.substr(0, digits);
  std::string_view suffix = text.substr(digits);
  int64_t factor = suffix.empty() ? 1000 : 0;  // a bare number is seconds
  for (const Unit& u : kUnits) {
    if (suffix == u.suffix) factor = u.ms;
  }
  int64_t n = 0;
  if (factor == 0 || !ParseDecimal(number, &n)) {
    return Status::InvalidArgument(
        Quote(text) + " is not a duration (a whole number with unit ms, s, m, h or d, e.g. 30s)");
  }
  if (n > kMaxDurationMs / factor) {
    return Status::InvalidArgument(Quote(text) + " is too long a duration (at most " +
                                   FormatDuration(kMaxDurationMs) + ")");
  }
  return n * factor;
}

std::string FormatDuration(int64_t ms) {
  if (ms == 0) return "0";
  for (const Unit& u : kUnits) {
    if (ms % u.ms == 0) return std::to_string(ms / u.ms) + std::string(u.suffix);
  }
  return std::to_string(ms) + "ms";  // not reached: every value is a whole number of ms
}

bool IsLoopback(const sockaddr_storage& addr) {
  if (addr.ss_family == AF_INET) {
    return (ntohl(reinterpret_cast<const sockaddr_in*>(&addr)->sin_addr.s_addr) >> 24) == 127;
  }
  if (addr.ss_family == AF_INET6) {
    const in6_addr& a = reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(&a) || (IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127);
  }
  return false;
}

std::optional<uid_t> LoopbackPeerUid(int fd, const sockaddr_storage* peer) {
  sockaddr_storage local{}, remote{};
  socklen_t llen = sizeof(local), rlen = sizeof(remote);
  if (peer != nullptr) {
    remote = *peer;
  } else if (getpeername(fd, reinterpret_cast<sockaddr*>(&remote), &rlen) != 0) {
    return std::nullopt;
  }
  if (!IsLoopback(remote) || getsockname(fd, reinterpret_cast<sockaddr*>(&local), &llen) != 0 ||
      local.ss_family != remote.ss_family) {
    return std::nullopt;
  }
  // The socket asked about is the client's: its own end is our peer.
  Result<uid_t> uid = loop::TcpPeerOwner(reinterpret_cast<const sockaddr*>(&remote),
                                         reinterpret_cast<const sockaddr*>(&local));
  if (!uid.ok()) return std::nullopt;
  return *uid;
}

bool IsSelfConnected(int fd, const sockaddr* peer) {
  sockaddr_storage local{}, remote{};
  socklen_t llen = sizeof(local);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &llen) != 0) return false;
  if (peer == nullptr) {
    socklen_t rlen = sizeof(remote);
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&remote), &rlen) != 0) return false;
    peer = reinterpret_cast<const sockaddr*>(&remote);
  }
  if (local.ss_family != peer->sa_family) return false;
  if (local.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&local);
    auto* b = reinterpret_cast<const sockaddr_in*>(peer);
    return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
  }
  if (local.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<const sockaddr_in6*>(&local);
    auto* b = reinterpret_cast<const sockaddr_in6*>(peer);
    return a->sin6_port == b->sin6_port &&
           std::memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(in6_addr)) == 0;
  }
  return false;
}

}  // namespace brokerproxy
