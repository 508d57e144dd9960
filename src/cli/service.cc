#include "cli/service.h"

#include <systemd/sd-daemon.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "loop/log.h"

namespace brokerproxy::cli {

Result<std::unique_ptr<ServiceNotifier>> ServiceNotifier::Create(loop::Loop* loop,
                                                                 StatusFn status) {
  std::unique_ptr<ServiceNotifier> n(new ServiceNotifier(loop, std::move(status)));
  const char* socket = std::getenv("NOTIFY_SOCKET");
  n->active_ = socket != nullptr && socket[0] != '\0';
  if (!n->active_) return n;
  uint64_t usec = 0;
  // > 0 only if $WATCHDOG_USEC is set and $WATCHDOG_PID, if set, is this process.
  if (sd_watchdog_enabled(/*unset_environment=*/0, &usec) > 0 && usec > 0) {
    n->watchdog_ms_ = usec / 1000 > 0 ? usec / 1000 : 1;
  }
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
  int rc = sd_notify(/*unset_environment=*/0, message.c_str());
  if (rc < 0 && !warned_) {
    warned_ = true;
    LOG_WARN("sd_notify: %s", std::strerror(-rc));
  }
}

}  // namespace brokerproxy::cli
