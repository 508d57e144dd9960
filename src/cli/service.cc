#include "cli/service.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "loop/log.h"

namespace brokerproxy::cli {
namespace {

// The manager's watchdog period in µs: $WATCHDOG_USEC, if $WATCHDOG_PID is unset or names this
// process (it is meant for the main process alone); 0 otherwise.
uint64_t WatchdogUsec() {
  const char* usec = std::getenv("WATCHDOG_USEC");
  if (usec == nullptr || *usec == '\0') return 0;
  if (const char* pid = std::getenv("WATCHDOG_PID"); pid != nullptr && *pid != '\0') {
    char* end = nullptr;
    errno = 0;
    unsigned long long p = std::strtoull(pid, &end, 10);
    if (errno != 0 || *end != '\0' || p != static_cast<unsigned long long>(::getpid())) return 0;
  }
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(usec, &end, 10);
  if (errno != 0 || *end != '\0' || *usec == '-') return 0;
  return v;
}

}  // namespace

// The notification protocol (sd_notify(3)): one datagram of "KEY=VALUE" lines to the AF_UNIX
// socket named by $NOTIFY_SOCKET, a path or, with a leading '@', an abstract name. The manager
// learns the sender from the credentials the kernel attaches (SO_PASSCRED on its socket), so
// nothing else is sent. Returns 0 or -errno.
int NotifyServiceManager(std::string_view message) {
  const char* name = std::getenv("NOTIFY_SOCKET");
  if (name == nullptr || *name == '\0') return 0;
  std::string_view path(name);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path) || (path[0] != '/' && path[0] != '@')) {
    return -EINVAL;
  }
  path.copy(addr.sun_path, path.size());
  if (path[0] == '@') addr.sun_path[0] = '\0';  // abstract: no terminating NUL either
  auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() +
                                    (path[0] == '/' ? 1 : 0));
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  ssize_t n = ::sendto(fd, message.data(), message.size(), MSG_NOSIGNAL | MSG_DONTWAIT,
                       reinterpret_cast<const sockaddr*>(&addr), len);
  int err = n < 0 ? errno : 0;
  ::close(fd);
  return -err;
}

Result<std::unique_ptr<ServiceNotifier>> ServiceNotifier::Create(loop::Loop* loop,
                                                                 StatusFn status) {
  std::unique_ptr<ServiceNotifier> n(new ServiceNotifier(loop, std::move(status)));
  const char* socket = std::getenv("NOTIFY_SOCKET");
  n->active_ = socket != nullptr && socket[0] != '\0';
  if (!n->active_) return n;
  if (uint64_t usec = WatchdogUsec(); usec > 0)
    n->watchdog_ms_ = std::max<uint64_t>(usec / 1000, 1);
  auto timer = loop::Timer::Create(*loop);
  if (!timer.ok()) return timer.status();
  n->timer_ = std::move(timer).value();
  return n;
}

ServiceNotifier::~ServiceNotifier() = default;

void ServiceNotifier::Ready() {
  if (!active_) return;
  Send("READY=1\nSTATUS=" + status_());
  next_status_ms_ = loop_->Now() + kStatusIntervalMs;
  // Half the watchdog period, as sd_watchdog_enabled(3) advises; at least every status
  // interval otherwise.
  uint64_t period = watchdog_ms_ > 0 ? std::max<uint64_t>(watchdog_ms_ / 2, 1) : kStatusIntervalMs;
  if (period > kStatusIntervalMs) period = kStatusIntervalMs;
  timer_->Start(period, period, [this] { Tick(); });
}

void ServiceNotifier::Stopping() {
  if (!active_) return;
  if (timer_) timer_->Stop();
  Send("STOPPING=1\nSTATUS=stopping");
}

void ServiceNotifier::Reloading() {
  if (active_) Send("RELOADING=1\nSTATUS=reloading the configuration");
}

void ServiceNotifier::Reloaded() {
  if (active_) Send("READY=1\nSTATUS=" + status_());
}

void ServiceNotifier::HandOver(int successor) {
  if (!active_) return;
  if (timer_) timer_->Stop();
  Send("MAINPID=" + std::to_string(successor) + "\nSTATUS=handed over to process " +
       std::to_string(successor));
  active_ = false;
}

void ServiceNotifier::Tick() {
  std::string message;
  if (watchdog_ms_ > 0) message = "WATCHDOG=1";
  if (loop_->Now() >= next_status_ms_) {
    next_status_ms_ = loop_->Now() + kStatusIntervalMs;
    message += (message.empty() ? "" : "\n") + ("STATUS=" + status_());
  }
  if (!message.empty()) Send(message);
}

void ServiceNotifier::Send(const std::string& message) {
  // A datagram on a local socket: it does not block. A manager that went away is no reason to
  // stop serving; say so once.
  int rc = NotifyServiceManager(message);
  if (rc < 0 && !warned_) {
    warned_ = true;
    LOG_WARN("notifying the service manager on $NOTIFY_SOCKET: %s", std::strerror(-rc));
  }
}

}  // namespace brokerproxy::cli
