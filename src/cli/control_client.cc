#include "cli/control_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>

namespace brokerproxy::cli {

int64_t MonotonicMs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000 + ts.tv_nsec / 1000000;
}

namespace {

// Waits until `fd` is ready for `events` or the deadline passes.
Status WaitFor(int fd, short events, int64_t deadline_ms) {
  for (;;) {
    int64_t left = deadline_ms - MonotonicMs();
    if (left <= 0) return Status::Timeout("timed out");
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, static_cast<int>(left));
    if (n > 0) return Status::OK();
    if (n < 0 && errno != EINTR) return PosixError("poll", errno);
  }
}

}  // namespace

Result<std::string> ExchangeLine(int fd, const std::string& line, int64_t deadline_ms,
                                 size_t max_reply) {
  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(fd, line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      BP_RETURN_IF_ERROR(WaitFor(fd, POLLOUT, deadline_ms));
      continue;
    }
    return PosixError("send", errno);
  }
  std::string reply;
  char buf[4096];
  for (;;) {
    size_t nl = reply.find('\n');
    if (nl != std::string::npos) {
      reply.resize(nl);
      return reply;
    }
    if (reply.size() > max_reply) return Status::IOError("reply too long");
    BP_RETURN_IF_ERROR(WaitFor(fd, POLLIN, deadline_ms));
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      reply.append(buf, n);
    } else if (n == 0) {
      return Status::Unavailable("connection closed before a reply arrived");
    } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
      return PosixError("recv", errno);
    }
  }
}

namespace {

// Whoever can create the socket's name could serve a daemon of their own on it, answering with
// a secret and a port of their choosing. The daemon runs as root or as the user who owns the
// directory holding its socket (a user's own daemon under ~/.local/state), so the server must
// be one of those two, as SO_PEERCRED says (the credentials it had when it called listen()).
Status CheckServer(int fd, const std::string& path) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return PosixError("cannot tell who serves " + path, errno);
  }
  if (cred.uid == 0) return Status::OK();
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return PosixError("cannot stat " + dir, errno);
  if (cred.uid == st.st_uid) return Status::OK();
  return Status::PermissionDenied("the control socket " + path + " is served by uid " +
                                  std::to_string(cred.uid) +
                                  ", which is neither root nor the owner of " + dir + " (uid " +
                                  std::to_string(st.st_uid) + "); not sending anything to it");
}

}  // namespace

Result<registry::JsonPtr> LocalClient::Call(const registry::Request& request, int64_t timeout_ms) {
  int64_t deadline = MonotonicMs() + timeout_ms;
  if (path_.size() >= sizeof(sockaddr_un::sun_path)) {
    return Status::InvalidArgument("control socket path too long: " + path_);
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return PosixError("socket", errno);
  struct Closer {
    LocalClient* self;
    int fd;
    ~Closer() {
      self->SetActive(-1);  // before the close: Interrupt() must not shut down a reused number
      ::close(fd);
    }
  } closer{this, fd};
  if (!SetActive(fd)) return Status::Unavailable("interrupted");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path_.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    if (err == ENOENT || err == ECONNREFUSED || err == ENOTDIR) {
      return Status::Unavailable("the brokerproxy daemon is not running (nothing listens on " +
                                 path_ + ")");
    }
    if (err == EACCES || err == EPERM) {
      return Status::PermissionDenied("cannot connect to the daemon's socket " + path_ +
                                      ": permission denied");
    }
    if (err == EAGAIN) return Status::Unavailable("the daemon on " + path_ + " is overloaded");
    return PosixError("connect " + path_, err);
  }
  // Before a request (it may carry a secret) goes out: is this the daemon?
  BP_RETURN_IF_ERROR(CheckServer(fd, path_));
  auto reply =
      ExchangeLine(fd, registry::EncodeRequest(request) + "\n", deadline, registry::kMaxReplyBytes);
  if (!reply.ok() && Interrupted()) return Status::Unavailable("interrupted");
  if (!reply.ok()) {
    if (reply.status().code() == Status::Code::kTimeout) {
      return Status::Timeout("no reply from the daemon on " + path_ + " within " +
                             std::to_string(timeout_ms / 1000) + "s");
    }
    return reply.status().WithContext("talking to the daemon on " + path_);
  }
  return registry::ParseReply(*reply);
}

bool LocalClient::Interrupted() {
  std::lock_guard<std::mutex> lock(mu_);
  return interrupted_;
}

bool LocalClient::SetActive(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  active_fd_ = fd;
  return !interrupted_;
}

void LocalClient::Interrupt() {
  std::lock_guard<std::mutex> lock(mu_);
  interrupted_ = true;
  // The blocked poll() wakes up (the socket reads EOF) and the call fails at once.
  if (active_fd_ >= 0) ::shutdown(active_fd_, SHUT_RDWR);
}

}  // namespace brokerproxy::cli
