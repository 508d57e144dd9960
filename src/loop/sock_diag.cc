#include "loop/sock_diag.h"

#include <arpa/inet.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <optional>
#include <string>

#include "loop/stream.h"

namespace brokerproxy::loop {
namespace {

// How long one query may wait for the kernel's answer.
constexpr int kReceiveTimeoutMs = 1000;
// A port-filtered dump of listeners holds a handful of entries; anything near this is not an
// answer to our question.
constexpr int kMaxEntries = 4096;

// An address reduced to what inet_diag compares: family, 16 address bytes (4 used for IPv4),
// port. IPv4-mapped IPv6 becomes IPv4.
struct Endpoint {
  int family = AF_INET;
  unsigned char addr[16] = {};
  uint16_t port = 0;  // host order
};

Result<Endpoint> ToEndpoint(const sockaddr* sa) {
  Endpoint e;
  if (sa == nullptr) return Status::InvalidArgument("no address");
  if (sa->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    std::memcpy(e.addr, &in->sin_addr, 4);
    e.port = ntohs(in->sin_port);
    return e;
  }
  if (sa->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    e.port = ntohs(in6->sin6_port);
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
      std::memcpy(e.addr, &in6->sin6_addr.s6_addr[12], 4);
      return e;
    }
    e.family = AF_INET6;
    std::memcpy(e.addr, &in6->sin6_addr, 16);
    return e;
  }
  return Status::InvalidArgument("not an IPv4 or IPv6 address");
}

// One socket as the kernel described it.
struct Entry {
  int family = 0;
  int state = 0;
  uint16_t sport = 0;  // host order
  unsigned char src[16] = {};
  uid_t uid = 0;
  bool v6only = false;
  // No inode: its owner closed it. What is left may still be the socket (its uid is right) or
  // only a TIME_WAIT (or FIN_WAIT2) remnant, for which the kernel reports uid 0 whoever owned it.
  bool closed = false;
};

// A netlink socket kept open by each thread that asks (the daemon asks at every connection
// from a local address, so opening and releasing a socket per query would cost three system
// calls and the kernel's binding of a fresh netlink port each time). Every query carries its own
// sequence number, so that anything left of an earlier one (a dump cut short, an answer that
// came after its timeout) is skipped; a failed query closes the socket, and the next one opens
// a fresh one.
class DiagSocket {
 public:
  ~DiagSocket() { Close(); }

  static DiagSocket& ForThisThread() {
    thread_local DiagSocket socket;
    return socket;
  }

  Status Open() {
    if (fd_ >= 0) return Status::OK();
    fd_ = ::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd_ < 0) return PosixError("sock_diag: socket", errno);
    timeval tv{kReceiveTimeoutMs / 1000, (kReceiveTimeoutMs % 1000) * 1000};
    if (::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0) {
      Status s = PosixError("sock_diag: SO_RCVTIMEO", errno);
      Close();
      return s;
    }
    return Status::OK();
  }

  // Sends `req` (with an optional bytecode attribute) and hands every answered socket to
  // `each`. A dump ends with NLMSG_DONE; a single lookup with its one answer. Any failure but
  // NotFound closes the socket (what is left of the answer must not meet the next query).
  Status Query(const inet_diag_req_v2& req, bool dump, const void* bytecode, size_t bc_len,
               const std::function<void(const Entry&)>& each) {
    BP_RETURN_IF_ERROR(Open());
    Status s = Exchange(req, dump, bytecode, bc_len, each);
    if (!s.ok() && s.code() != Status::Code::kNotFound) Close();
    return s;
  }

 private:
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  Status Exchange(const inet_diag_req_v2& req, bool dump, const void* bytecode, size_t bc_len,
                  const std::function<void(const Entry&)>& each) {
    struct {
      nlmsghdr nlh;
      inet_diag_req_v2 req;
      nlattr attr;
      unsigned char bc[64];
    } msg{};
    if (bc_len > sizeof(msg.bc)) return Status::Internal("sock_diag: bytecode too long");
    size_t len = NLMSG_LENGTH(sizeof(inet_diag_req_v2));
    msg.req = req;
    if (bc_len > 0) {
      msg.attr.nla_type = INET_DIAG_REQ_BYTECODE;
      msg.attr.nla_len = static_cast<uint16_t>(NLA_HDRLEN + bc_len);
      std::memcpy(msg.bc, bytecode, bc_len);
      len += NLA_ALIGN(msg.attr.nla_len);
    }
    msg.nlh.nlmsg_len = static_cast<uint32_t>(len);
    msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    msg.nlh.nlmsg_flags = NLM_F_REQUEST | (dump ? NLM_F_DUMP : 0);
    uint32_t seq = ++seq_;
    if (seq == 0) seq = ++seq_;  // 0 never names a query of ours
    msg.nlh.nlmsg_seq = seq;
    sockaddr_nl kernel{};
    kernel.nl_family = AF_NETLINK;
    if (::sendto(fd_, &msg, len, 0, reinterpret_cast<const sockaddr*>(&kernel), sizeof(kernel)) <
        0) {
      return PosixError("sock_diag: send", errno);
    }
    alignas(nlmsghdr) unsigned char buf[32768];
    int entries = 0;
    for (;;) {
      ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          return Status::Timeout("sock_diag: the kernel did not answer");
        }
        return PosixError("sock_diag: receive", errno);
      }
      if (n == 0) return Status::IOError("sock_diag: empty answer");
      int remaining = static_cast<int>(n);
      for (auto* h = reinterpret_cast<nlmsghdr*>(buf); NLMSG_OK(h, remaining);
           h = NLMSG_NEXT(h, remaining)) {
        if (h->nlmsg_seq != seq) continue;  // left of an earlier query
        if (h->nlmsg_type == NLMSG_DONE) return Status::OK();
        if (h->nlmsg_type == NLMSG_ERROR) {
          if (h->nlmsg_len < NLMSG_LENGTH(sizeof(nlmsgerr))) {
            return Status::IOError("sock_diag: truncated error");
          }
          int err = -static_cast<const nlmsgerr*>(NLMSG_DATA(h))->error;
          if (err == 0) return Status::OK();
          if (err == ENOENT) return Status::NotFound("no such socket");
          return PosixError("sock_diag", err);
        }
        if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY ||
            h->nlmsg_len < NLMSG_LENGTH(sizeof(inet_diag_msg))) {
          continue;
        }
        if (++entries > kMaxEntries) return Status::ResourceExhausted("sock_diag: too many");
        const auto* m = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
        Entry e;
        e.family = m->idiag_family;
        e.state = m->idiag_state;
        e.sport = ntohs(m->id.idiag_sport);
        std::memcpy(e.src, m->id.idiag_src, 16);
        e.uid = m->idiag_uid;
        e.closed = m->idiag_inode == 0;
        int attr_len = static_cast<int>(h->nlmsg_len) - static_cast<int>(NLMSG_LENGTH(sizeof(*m)));
        for (auto* a = reinterpret_cast<const rtattr*>(m + 1); RTA_OK(a, attr_len);
             a = RTA_NEXT(a, attr_len)) {
          if (a->rta_type == INET_DIAG_SKV6ONLY && RTA_PAYLOAD(a) >= 1) {
            e.v6only = *static_cast<const unsigned char*>(RTA_DATA(a)) != 0;
          }
        }
        each(e);
        if (!dump) return Status::OK();
      }
    }
  }

 private:
  int fd_ = -1;
  uint32_t seq_ = 0;
};

bool IsZero(const unsigned char* a, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != 0) return false;
  }
  return true;
}

bool IsMappedTo(const unsigned char* v6, const unsigned char* v4) {
  static const unsigned char kPrefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return std::memcmp(v6, kPrefix, 12) == 0 && std::memcmp(v6 + 12, v4, 4) == 0;
}

// True if the entry's own address is `e`'s (an IPv6 socket may carry an IPv4 one mapped).
bool SameAddress(const Entry& entry, const Endpoint& e) {
  if (entry.family == AF_INET) return e.family == AF_INET && std::memcmp(entry.src, e.addr, 4) == 0;
  if (e.family == AF_INET6) return std::memcmp(entry.src, e.addr, 16) == 0;
  return IsMappedTo(entry.src, e.addr);
}

// How well a listener matches `target`: 2 exact address, 1 wildcard, 0 not at all.
int MatchLevel(const Entry& l, const Endpoint& target) {
  if (l.family == AF_INET) {
    if (target.family != AF_INET) return 0;
    if (std::memcmp(l.src, target.addr, 4) == 0) return 2;
    return IsZero(l.src, 4) ? 1 : 0;
  }
  if (target.family == AF_INET6) {
    if (std::memcmp(l.src, target.addr, 16) == 0) return 2;
    return IsZero(l.src, 16) ? 1 : 0;
  }
  if (IsMappedTo(l.src, target.addr)) return 2;
  return IsZero(l.src, 16) && !l.v6only ? 1 : 0;
}

}  // namespace

Result<uid_t> TcpListenerOwner(const sockaddr* local) {
  auto target = ToEndpoint(local);
  if (!target.ok()) return target.status();
  if (target->port == 0) return Status::InvalidArgument("port 0 is never listened on");
  // Listeners on this port only: sport >= P && sport <= P. A failed test jumps past the end
  // (len + 4), which rejects the socket.
  inet_diag_bc_op bc[4] = {};
  bc[0] = {INET_DIAG_BC_S_GE, sizeof(inet_diag_bc_op) * 2, sizeof(inet_diag_bc_op) * 4 + 4};
  bc[1].no = target->port;
  bc[2] = {INET_DIAG_BC_S_LE, sizeof(inet_diag_bc_op) * 2, sizeof(inet_diag_bc_op) * 2 + 4};
  bc[3].no = target->port;

  int best_level = 0;
  std::optional<uid_t> owner;
  bool conflict = false;
  auto consider = [&](const Entry& e) {
    if (e.state != TCP_LISTEN || e.sport != target->port) return;  // the filter, re-checked
    int level = MatchLevel(e, *target);
    if (level == 0 || level < best_level) return;
    if (level > best_level) {
      best_level = level;
      owner = e.uid;
      conflict = false;
    } else if (owner != e.uid) {
      conflict = true;
    }
  };
  // An IPv4 address may be served by IPv6 sockets too (wildcard or IPv4-mapped).
  for (int family : {AF_INET, AF_INET6}) {
    if (target->family == AF_INET6 && family == AF_INET) continue;
    DiagSocket& s = DiagSocket::ForThisThread();
    inet_diag_req_v2 req{};
    req.sdiag_family = static_cast<uint8_t>(family);
    req.sdiag_protocol = IPPROTO_TCP;
    req.idiag_states = 1u << TCP_LISTEN;
    BP_RETURN_IF_ERROR(s.Query(req, /*dump=*/true, bc, sizeof(bc), consider));
  }
  std::string where = FormatAddress(local);
  if (!owner) return Status::NotFound("nothing listens on " + where);
  if (conflict) {
    return Status::PermissionDenied("listeners of different users share " + where);
  }
  return *owner;
}

Result<uid_t> TcpPeerOwner(const sockaddr* local, const sockaddr* remote) {
  auto l = ToEndpoint(local);
  if (!l.ok()) return l.status();
  auto r = ToEndpoint(remote);
  if (!r.ok()) return r.status();
  if (l->family != r->family) return Status::InvalidArgument("address families differ");
  inet_diag_req_v2 req{};
  req.sdiag_family = static_cast<uint8_t>(l->family);
  req.sdiag_protocol = IPPROTO_TCP;
  req.idiag_states = ~0u;
  req.id.idiag_sport = htons(l->port);
  req.id.idiag_dport = htons(r->port);
  std::memcpy(req.id.idiag_src, l->addr, 16);
  std::memcpy(req.id.idiag_dst, r->addr, 16);
  req.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
  req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
  DiagSocket& s = DiagSocket::ForThisThread();
  std::optional<uid_t> owner;
  bool closed = false;
  Status st = s.Query(req, /*dump=*/false, nullptr, 0, [&](const Entry& e) {
    // The lookup falls back to a listener when no connection matches; only an exact match
    // answers the question.
    if (e.state != TCP_LISTEN && e.sport == l->port && SameAddress(e, *l)) {
      owner = e.uid;
      closed = e.closed;
    }
  });
  std::string what = FormatAddress(local) + " -> " + FormatAddress(remote);
  if (!st.ok()) return st.WithContext(what);
  // A remnant says uid 0: a client that closes at once must not pass for root.
  if (owner && closed && *owner == 0) {
    return Status::NotFound("closed, and the kernel no longer says by whom: " + what);
  }
  if (!owner) return Status::NotFound("no such socket: " + what);
  return *owner;
}

Status OpenSockDiag() { return DiagSocket::ForThisThread().Open(); }

}  // namespace brokerproxy::loop
