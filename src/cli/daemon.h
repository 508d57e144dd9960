// `brokerproxy run`: the daemon on the login node.
//
// One loop hosts the registry (Broker + Store), the control socket and the proxy listener.
// SIGTERM, SIGINT and SIGHUP stop it cleanly: it stops accepting, lets a registry write in
// flight land, closes every connection and exits 0.

#ifndef BROKERPROXY_CLI_DAEMON_H_
#define BROKERPROXY_CLI_DAEMON_H_

#include <sys/types.h>

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
Status RunDaemon(const Config& config);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_DAEMON_H_
