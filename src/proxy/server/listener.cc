#include "proxy/server/listener.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "loop/log.h"
#include "loop/stream.h"
#include "proxy/transport/relay.h"

namespace brokerproxy::proxy {
namespace {

constexpr uint64_t kPauseMs = 1000;

}  // namespace

Result<int> OpenListeningSocket(const HostPort& address, int keepalive_s) {
  std::string host = address.host;
  if (host == "*") host = "0.0.0.0";
  // Start-up and reload only, so a blocking lookup of "localhost" is fine.
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(address.port);
  int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    return Status::InvalidArgument("cannot listen on " + address.ToString() + ": " +
                                   gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(res, ::freeaddrinfo);

  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return PosixError("socket", errno);
  int one = 1;
  (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (res->ai_family == AF_INET6) {
    // "::" means IPv6 only; list "0.0.0.0" separately for IPv4, so both are explicit.
    (void)::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  }
  if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
    Status s = PosixError("cannot listen on " + address.ToString(), errno);
    ::close(fd);
    return s;
  }
  if (keepalive_s >= 0) TuneTcpSocket(fd, keepalive_s);
  if (::listen(fd, SOMAXCONN) != 0) {
    Status s = PosixError("listen " + address.ToString(), errno);
    ::close(fd);
    return s;
  }
  return fd;
}

Result<std::unique_ptr<Listener>> Listener::Create(loop::Reactor* reactor, const HostPort& address,
                                                   int keepalive_s, AcceptCallback on_accept,
                                                   OverloadCallback on_overload,
                                                   std::string overload_reply) {
  Result<int> fd = OpenListeningSocket(address, keepalive_s);
  if (!fd.ok()) return fd.status();
  return Adopt(reactor, *fd, keepalive_s, std::move(on_accept), std::move(on_overload),
               std::move(overload_reply));
}

Result<std::unique_ptr<Listener>> Listener::Adopt(loop::Reactor* reactor, int fd, int keepalive_s,
                                                  AcceptCallback on_accept,
                                                  OverloadCallback on_overload,
                                                  std::string overload_reply) {
  int listening = 0;
  socklen_t optlen = sizeof(listening);
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || !listening) {
    ::close(fd);
    return Status::InvalidArgument("descriptor " + std::to_string(fd) +
                                   " is not a listening socket");
  }
  (void)::fcntl(fd, F_SETFD, FD_CLOEXEC);
  (void)::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  TuneTcpSocket(fd, keepalive_s);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);

  std::unique_ptr<Listener> l(
      new Listener(std::move(on_accept), std::move(on_overload), std::move(overload_reply)));
  l->spare_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  l->address_ = loop::FormatAddress(reinterpret_cast<sockaddr*>(&bound));
  l->port_ = ntohs(bound.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&bound)->sin_port
                                              : reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
  auto timer = loop::Timer::Create(reactor->loop());
  if (!timer.ok()) {
    ::close(fd);
    return timer.status();
  }
  l->resume_ = std::move(timer).value();
  Listener* raw = l.get();
  // Connections that arrived before this registration are reported by its first edge.
  auto io = reactor->Add(fd, [raw](loop::IoWatch* w) { raw->OnReady(w); });
  if (!io.ok()) return io.status();  // the reactor closed the fd
  l->io_ = std::move(io).value();
  return l;
}

Listener::~Listener() {
  if (spare_fd_ >= 0) ::close(spare_fd_);
}

void Listener::OnReady(loop::IoWatch* w) {
  w->ClearWritable();  // a listening socket is never written to
  if (paused_ || !w->readable()) return;
  for (int i = 0; i < kAcceptBatch; ++i) {
    sockaddr_storage peer{};
    socklen_t len = sizeof(peer);
    int fd =
        ::accept4(w->fd(), reinterpret_cast<sockaddr*>(&peer), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      overloaded_ = false;
      on_accept_(fd, peer);
      continue;
    }
    switch (errno) {
      case EAGAIN:
        w->ClearReadable();  // the next connection brings a new edge
        return;
      case EINTR:
        continue;
      case EMFILE:
        if (!overloaded_) {
          LOG_WARN("listener %s: out of file descriptors; turning new connections away",
                   address_.c_str());
          overloaded_ = true;
        }
        switch (RefuseOne()) {
          case 0:
            continue;  // refused one; more may wait
          case EAGAIN:
            w->ClearReadable();  // no one else waits
            return;
          default:
            errno = EMFILE;
            break;
        }
        [[fallthrough]];
      case ENFILE:
      case ENOBUFS:
      case ENOMEM:
        // The pending connection stays in the backlog; retrying now would spin.
        LOG_WARN("listener %s: cannot accept (%s); pausing for %llu ms", address_.c_str(),
                 std::strerror(errno), static_cast<unsigned long long>(kPauseMs));
        // The watch stays readable: resuming needs no new edge.
        paused_ = true;
        if (on_overload_) on_overload_();
        resume_->Start(kPauseMs, [this] {
          paused_ = false;
          io_->Yield();
        });
        return;
      default:
        // ECONNABORTED and friends concern one connection only.
        continue;
    }
  }
  // More may wait, with no new edge to say so: come back after the rest of the loop had a turn.
  w->Yield();
}

int Listener::RefuseOne() {
  if (spare_fd_ < 0) {
    spare_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);  // fds may have come back
    if (spare_fd_ < 0) return EMFILE;
  }
  ::close(spare_fd_);
  int fd = ::accept4(io_.fd(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  int err = fd >= 0 ? 0 : errno;
  if (fd >= 0) {
    if (!overload_reply_.empty()) SendBestEffort(fd, overload_reply_);
    CloseGracefully(fd);  // a client's early bytes must not turn the close into a reset
    if (on_overload_) on_overload_();
  }
  spare_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  return err;
}

void Listener::SetKeepalive(int keepalive_s) {
  int on = keepalive_s > 0 ? 1 : 0;
  (void)::setsockopt(io_.fd(), SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
  if (on)
    (void)::setsockopt(io_.fd(), IPPROTO_TCP, TCP_KEEPIDLE, &keepalive_s, sizeof(keepalive_s));
}

}  // namespace brokerproxy::proxy
