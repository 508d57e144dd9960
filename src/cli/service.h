// Service: what the daemon tells a service manager (systemd, Type=notify) about itself, in
// sd_notify(3)'s protocol on $NOTIFY_SOCKET (spoken here: a datagram is all it takes, and
// libsystemd would load seven libraries into the daemon for it). Without that variable (a daemon
// started by hand or by a test) every call here does nothing and costs nothing.
//
//   READY=1     once the registry is loaded and every listener (proxy ports, control socket)
//               accepts: the manager starts dependent units and reports the start as done;
//   STATUS=...  "N sessions, M jobs", refreshed periodically (systemctl status shows it);
//   WATCHDOG=1  from the loop, at half the period the manager asked for ($WATCHDOG_USEC), so a
//               loop that stops turning (a blocking call, a livelock) gets the daemon restarted;
//   RELOADING=1, then READY=1, around a configuration reload (SIGHUP);
//   STOPPING=1  when a signal begins the shutdown.
//
// Loop-thread only. The notifier must be destroyed before the loop.

#ifndef BROKERPROXY_CLI_SERVICE_H_
#define BROKERPROXY_CLI_SERVICE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/status.h"
#include "loop/timer.h"

namespace brokerproxy::cli {

// Sends `message` (newline-separated KEY=VALUE assignments) to the socket $NOTIFY_SOCKET names:
// a path, or an abstract name after '@'. 0 if sent or if the variable is unset; else -errno
// (-EINVAL for an address of another form).
int NotifyServiceManager(std::string_view message);

class ServiceNotifier {
 public:
  // The daemon's one-line status ("3 sessions, 12 jobs").
  using StatusFn = std::function<std::string()>;

  // How often STATUS= is refreshed when no watchdog asks for more often.
  static constexpr uint64_t kStatusIntervalMs = 10000;

  // Reads $NOTIFY_SOCKET and $WATCHDOG_USEC. They stay in the environment: the scheduler
  // commands the daemon runs inherit them, and the unit's NotifyAccess=main makes the manager
  // ignore anything but the daemon itself. Not OK only if a timer cannot be made.
  static Result<std::unique_ptr<ServiceNotifier>> Create(loop::Loop* loop, StatusFn status);
  ~ServiceNotifier();
  ServiceNotifier(const ServiceNotifier&) = delete;
  ServiceNotifier& operator=(const ServiceNotifier&) = delete;

  // True if a service manager listens ($NOTIFY_SOCKET is set).
  bool active() const { return active_; }
  // The watchdog period the manager asked for, in ms (0: none).
  uint64_t watchdog_ms() const { return watchdog_ms_; }

  // READY=1 with the first STATUS=, and starts the periodic pings.
  void Ready();
  // STOPPING=1; the pings stop.
  void Stopping();
  // RELOADING=1 when a reload begins; READY=1 (with STATUS=) when it is over, applied or not.
  void Reloading();
  void Reloaded();
  // MAINPID=`successor`: the manager follows the new process (an upgrade); this one sends
  // nothing more.
  void HandOver(int successor);

 private:
  ServiceNotifier(loop::Loop* loop, StatusFn status) : loop_(loop), status_(std::move(status)) {}
  void Tick();
  void Send(const std::string& message);

  loop::Loop* loop_;
  StatusFn status_;
  bool active_ = false;
  uint64_t watchdog_ms_ = 0;
  uint64_t next_status_ms_ = 0;
  bool warned_ = false;
  loop::HandlePtr<loop::Timer> timer_;
};

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_SERVICE_H_
