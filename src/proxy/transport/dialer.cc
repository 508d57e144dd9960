#include "proxy/transport/dialer.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "loop/address.h"
#include "loop/stream.h"
#include "proxy/transport/relay.h"

namespace brokerproxy::proxy {
namespace {

void SetPort(sockaddr_storage* ss, int port) {
  if (ss->ss_family == AF_INET) {
    reinterpret_cast<sockaddr_in*>(ss)->sin_port = htons(static_cast<uint16_t>(port));
  } else if (ss->ss_family == AF_INET6) {
    reinterpret_cast<sockaddr_in6*>(ss)->sin6_port = htons(static_cast<uint16_t>(port));
  }
}

}  // namespace

loop::Pending ResolveCache::Resolve(const std::string& host, int port, Callback cb,
                                    uint64_t group) {
  uint64_t now = loop_->Now();
  auto it = entries_.find(host);
  if (it != entries_.end() && it->second.expires_ms > now) {
    Result<Addresses> out = it->second.addresses;
    if (out.ok()) {
      for (auto& a : *out) SetPort(&a, port);
    }
    // Still answered on a later turn, like every other path.
    return loop::Post(*loop_, [cb = std::move(cb), out = std::move(out)] { cb(out); });
  }
  auto done = [this, host, cb = std::move(cb)](Result<Addresses> r) {
    if (entries_.size() > 4096) entries_.clear();  // bound the cache
    int64_t ttl = r.ok() ? ttl_ms_ : std::min(ttl_ms_, kNegativeTtlMs);
    Entry e{r, loop_->Now() + static_cast<uint64_t>(ttl)};
    if (e.addresses.ok()) {
      for (auto& a : *e.addresses) SetPort(&a, 0);
    }
    entries_[host] = std::move(e);
    cb(std::move(r));
  };
  return loop::Resolve(*loop_, host, port, std::move(done), group);
}

void ResolveCache::SeedForTesting(const std::string& host, Addresses addresses) {
  for (auto& a : addresses) SetPort(&a, 0);
  entries_[host] = Entry{std::move(addresses), loop_->Now() + static_cast<uint64_t>(ttl_ms_)};
}

namespace {

bool Established(int fd) {
  tcp_info info{};
  socklen_t len = sizeof(info);
  return ::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 &&
         info.tcpi_state == TCP_ESTABLISHED;
}

}  // namespace

void Dialer::Dial(const std::string& host, int port, Callback cb, bool may_complete_inline) {
  cb_ = std::move(cb);
  target_ =
      (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
  // The common case, a numeric backend address, connects now: no extra loop turn.
  if (auto numeric = loop::ParseNumericAddress(host, port)) {
    addresses_.push_back(*numeric);
    if (!TryNext()) {
      Fail(last_error_);
      return;
    }
    if (may_complete_inline && IsLoopback(*numeric) && Established(socket_.fd())) {
      Connected(/*established=*/true);  // last: may destroy this
    }
    return;
  }
  pending_ = cache_->Resolve(
      host, port,
      [this](Result<ResolveCache::Addresses> r) {
        if (!r.ok()) {
          Fail(r.status());
          return;
        }
        addresses_ = std::move(r).value();
        if (!TryNext()) Fail(last_error_);
      },
      resolve_group_);
}

bool Dialer::TryNext() {
  while (next_ < addresses_.size()) {
    const sockaddr_storage& addr = addresses_[next_++];
    if (check_) {
      // Checked on the resolved address, right before connecting: a name cannot smuggle in
      // what the address would not pass.
      Status allowed = check_(addr);
      if (!allowed.ok()) {
        refused_ = refused_ || allowed.code() == Status::Code::kNotFound ||
                   allowed.code() == Status::Code::kPermissionDenied;
        last_error_ = std::move(allowed);
        continue;
      }
    }
    int fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      last_error_ = PosixError("socket", errno);
      continue;
    }
    socklen_t len = addr.ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) != 0 && errno != EINPROGRESS) {
      refused_ = refused_ || errno == ECONNREFUSED;
      last_error_ = PosixError(
          "connect " + loop::FormatAddress(reinterpret_cast<const sockaddr*>(&addr)), errno);
      ::close(fd);
      continue;
    }
    // Writable (or failed) once the handshake is done, whether connect() finished at once.
    auto io = reactor_->Add(fd, [this](loop::IoWatch* w) { OnEvent(w); });
    if (!io.ok()) {
      last_error_ = io.status();
      continue;
    }
    socket_ = std::move(io).value();
    return true;
  }
  if (last_error_.ok()) last_error_ = Status::Unavailable("no address to connect to");
  return false;
}

void Dialer::OnEvent(loop::IoWatch* w) {
  if (!w->writable()) return;  // e.g. a first byte from the backend before the EPOLLOUT edge
  Connected(/*established=*/false);
}

void Dialer::Connected(bool established) {
  loop::IoWatch* w = socket_.get();
  int err = established ? 0 : SocketError(w->fd());
  // A local backend port that nothing listens on can yield a connection to ourselves.
  if (err == 0 &&
      IsSelfConnected(w->fd(), reinterpret_cast<const sockaddr*>(&addresses_[next_ - 1]))) {
    err = ECONNREFUSED;
  }
  if (err != 0) {
    refused_ = refused_ || err == ECONNREFUSED;
    last_error_ = PosixError("connect " + target_, err);
    socket_.reset();
    if (!TryNext()) Fail(last_error_);
    return;
  }
  socket_->SetCallback(nullptr);
  if (keepalive_s_ >= 0) {
    const sockaddr_storage& peer = addresses_[next_ - 1];
    TuneTcpSocket(w->fd(), IsLoopback(peer) ? 0 : keepalive_s_);
  }
  // Connected within connect() (a loopback backend): writable now, a loop turn before the edge
  // says so, so that bytes already waiting for the backend go at once.
  if (established) socket_->SetWritable();
  Callback cb = std::move(cb_);
  if (observer_) observer_(/*connected=*/true, /*refused=*/false);
  cb(std::move(socket_));  // may destroy this
}

void Dialer::Fail(Status status) {
  // Never inside Dial(): report on a later turn.
  pending_ = loop::Post(reactor_->loop(), [this, status] {
    Callback cb = std::move(cb_);
    if (!cb) return;
    if (observer_) observer_(/*connected=*/false, refused_);
    cb(status.WithContext(target_));
  });
}

}  // namespace brokerproxy::proxy
