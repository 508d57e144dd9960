// `brokerproxy run`: the daemon on the login node.
//
// One loop hosts the registry (Broker + Store), the control socket and the proxy listener.
// SIGTERM and SIGINT stop it cleanly: it stops accepting, lets a registry write in flight land,
// closes every connection and exits 0.
//
// SIGHUP reloads the configuration without touching an established session: the file is read
// again (with the same -c, --set and flags), and a configuration with any error is rejected as
// a whole, the running one staying. What can change live is applied: log_level, log_format, the
// proxy's listen addresses (added ones bound, removed ones closed), its limits and timeouts,
// plain_allow, backend_allow, the throttle, keepalive, banner_delay, tls_domain, and the TLS
// material (the CA and the proxy's certificate are read again from their files). Every other
// change is logged as needing a restart, and is not applied.
//
// SIGUSR2 upgrades the binary without refusing a connection or ending a session (as nginx
// does): the daemon starts the program now at its own path (which a package upgrade replaced)
// with the same command line, handing it the listening sockets (proxy ports, control socket;
// $BROKERPROXY_HANDOVER names the inherited descriptors). Control requests stop here first and
// queue in the socket, the registry file is complete on disk, and the new process loads it and
// serves. When it says it serves, this process stops accepting and stops writing the registry
// (a systemd manager is told the new MAINPID), finishes its sessions, and exits. If the new
// process fails to start, or does not serve within a minute, it is killed and this one goes on.

#ifndef BROKERPROXY_CLI_DAEMON_H_
#define BROKERPROXY_CLI_DAEMON_H_

#include <sys/types.h>

#include <functional>

#include <vector>

#include "cli/options.h"
#include "loop/status.h"
#include "registry/scheduler.h"

namespace brokerproxy::cli {

// The [scheduler] section, checked and resolved: the type, the command options, and the uids
// of admin_uids (names looked up now). InvalidArgument naming the key for a bad value.
struct SchedulerSettings {
  registry::SchedulerOptions options;
  std::vector<uid_t> admin_uids;
};
Result<SchedulerSettings> ResolveSchedulerSettings(const Config& config);

// Runs in the foreground until stopped; returns the start-up error if it cannot start.
// `reread` resolves the configuration again for SIGHUP (nullptr: SIGHUP re-applies `config`).
// `argv` is the command line that started it, to start its successor with on upgrade.
Status RunDaemon(const Config& config, std::function<Result<Config>()> reread = nullptr,
                 std::vector<std::string> argv = {});

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_DAEMON_H_
