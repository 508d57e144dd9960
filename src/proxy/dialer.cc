#include "proxy/dialer.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "loop/address.h"
#include "loop/stream.h"
#include "proxy/relay.h"

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

loop::Pending ResolveCache::Resolve(const std::string& host, int port, Callback cb) {
  uint64_t now = loop_->Now();
  auto it = entries_.find(host);
  if (it != entries_.end() && it->second.expires_ms > now) {
    Addresses out = it->second.addresses;
    for (auto& a : out) SetPort(&a, port);
    // Still answered on a later turn, like every other path.
    return loop::Post(*loop_, [cb = std::move(cb), out = std::move(out)] { cb(out); });
  }
  if (loop::ParseNumericAddress(host, port))
    return loop::Resolve(*loop_, host, port, std::move(cb));
  return loop::Resolve(*loop_, host, port, [this, host, cb = std::move(cb)](Result<Addresses> r) {
    if (r.ok()) {
      if (entries_.size() > 4096) entries_.clear();  // bound the cache
      Entry e{*r, loop_->Now() + static_cast<uint64_t>(ttl_ms_)};
      for (auto& a : e.addresses) SetPort(&a, 0);
      entries_[host] = std::move(e);
    }
    cb(std::move(r));
  });
}

void Dialer::Dial(const std::string& host, int port, Callback cb) {
  cb_ = std::move(cb);
  target_ =
      (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
  resolve_ = cache_->Resolve(host, port, [this](Result<ResolveCache::Addresses> r) {
    if (!r.ok()) {
      Fail(r.status());
      return;
    }
    addresses_ = std::move(r).value();
    TryNext();
  });
}

void Dialer::TryNext() {
  while (next_ < addresses_.size()) {
    const sockaddr_storage& addr = addresses_[next_++];
    int fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      last_error_ = PosixError("socket", errno);
      continue;
    }
    socklen_t len = addr.ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) != 0 && errno != EINPROGRESS) {
      last_error_ = PosixError(
          "connect " + loop::FormatAddress(reinterpret_cast<const sockaddr*>(&addr)), errno);
      ::close(fd);
      continue;
    }
    auto poll = loop::Poll::Create(*loop_, fd, loop::FdOwnership::kOwned);
    if (!poll.ok()) {
      last_error_ = poll.status();
      continue;
    }
    socket_ = std::move(poll).value();
    // Writable (or an error) once the handshake is done, whether connect() finished at once.
    socket_->Start(UV_WRITABLE, [this](int status, int) { OnWritable(status); });
    return;
  }
  Fail(last_error_.ok() ? Status::Unavailable("no address to connect to") : last_error_);
}

void Dialer::OnWritable(int) {
  int err = SocketError(socket_->fd());
  // A local backend port that nothing listens on can yield a connection to ourselves.
  if (err == 0 &&
      IsSelfConnected(socket_->fd(), reinterpret_cast<const sockaddr*>(&addresses_[next_ - 1]))) {
    err = ECONNREFUSED;
  }
  if (err != 0) {
    last_error_ = PosixError("connect " + target_, err);
    socket_.reset();
    TryNext();
    return;
  }
  socket_->Stop();
  Callback cb = std::move(cb_);
  cb(std::move(socket_));  // may destroy this
}

void Dialer::Fail(Status status) {
  Callback cb = std::move(cb_);
  if (cb) cb(status.WithContext(target_));
}

}  // namespace brokerproxy::proxy
