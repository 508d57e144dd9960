// Network address text: "host:port" endpoints and CIDR source lists.
//
// Pure functions, no I/O: parsing never resolves names. Used by the configuration (to check
// values when they are read) and by the proxy (to bind listeners and match client sources).

#ifndef BROKERPROXY_LOOP_ADDRESS_H_
#define BROKERPROXY_LOOP_ADDRESS_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/status.h"

namespace brokerproxy {

struct HostPort {
  std::string host;              // name or address literal, without brackets
  int port = 0;                  // 0..65535
  std::string ToString() const;  // "h:p", or "[v6]:p"
  bool operator==(const HostPort&) const = default;
};

// Accepts "host:port", "[v6addr]:port", and, when `default_port` is set, a bare "host" or a
// bare "port" (digits only, host then `default_host`). Port 0 is allowed only if `allow_zero`.
Result<HostPort> ParseHostPort(std::string_view text, std::optional<int> default_port = {},
                               std::string_view default_host = "127.0.0.1",
                               bool allow_zero = false);

// Splits "a, b ,c" on commas, trimming blanks; empty items are an error.
Result<std::vector<std::string>> SplitList(std::string_view text);

// An IPv4 or IPv6 network, "127.0.0.0/8", "::1/128", or a single address (full-length prefix).
// IPv4-mapped IPv6 client addresses (::ffff:a.b.c.d) match IPv4 networks.
class Cidr {
 public:
  static Result<Cidr> Parse(std::string_view text);
  bool Contains(const sockaddr* addr) const;
  std::string ToString() const;

 private:
  int family_ = AF_INET;
  unsigned char bytes_[16] = {};
  int prefix_ = 0;
};

// True if `addr` is in any of `nets`.
bool MatchesAny(const std::vector<Cidr>& nets, const sockaddr* addr);

// True if `addr` is a loopback address: 127.0.0.0/8, ::1, or 127.x mapped into IPv6.
bool IsLoopback(const sockaddr_storage& addr);

// The uid that owns the other end of `fd`, an accepted TCP socket whose peer is on this host
// (a loopback address): the kernel's socket table (sock_diag) knows it, so local clients, who
// all share 127.0.0.1, can still be told apart. nullopt if the peer is not local, is gone, or
// the lookup fails. One netlink round trip, answered by the kernel at once. `peer` is the peer's
// address, if known (as accept() returns it; saves a getpeername()).
std::optional<uid_t> LoopbackPeerUid(int fd, const sockaddr_storage* peer = nullptr);

// True if the connected TCP socket `fd` is connected to itself: a connect() to a local port
// that nothing listens on can, when that port lies in the ephemeral range, be given the same
// port as its source and complete as a "simultaneous open" with itself. `peer` is the address
// it connected to, if known (saves a getpeername()).
bool IsSelfConnected(int fd, const sockaddr* peer = nullptr);

// Duration text: "250ms", "30s", "5m", "2h", "1d", or bare seconds "30"; "0" means off.
// Returns milliseconds, at most kMaxDurationMs: every user of a duration may add it to a clock
// reading or round it up without overflow.
inline constexpr int64_t kMaxDurationMs = int64_t{3650} * 86400000;  // ten years
Result<int64_t> ParseDuration(std::string_view text);
std::string FormatDuration(int64_t ms);

}  // namespace brokerproxy

#endif  // BROKERPROXY_LOOP_ADDRESS_H_
