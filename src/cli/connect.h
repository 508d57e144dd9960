// `brokerproxy connect JOB`: the laptop side. Fetches the job's secret (`load`), then either
// listens locally and opens one tunnel per local connection, or (--stdio) carries stdin/stdout
// through one tunnel, so it works as an OpenSSH ProxyCommand.

#ifndef BROKERPROXY_CLI_CONNECT_H_
#define BROKERPROXY_CLI_CONNECT_H_

#include <string>

#include "cli/control_client.h"
#include "cli/options.h"
#include "cli/remote.h"
#include "loop/status.h"

namespace brokerproxy::cli {

struct ConnectArgs {
  std::string job;
  std::string listen;  // "[addr:]port"; port 0 picks a free one (printed); or "unix:PATH"
  // A --listen address that other hosts can reach: their connections cannot be traced to a
  // user, so they are served only with this set.
  bool allow_remote = false;
  bool stdio = false;
  std::string proxy;  // "host:port" of the proxy port; empty: [client] proxy
  // --proxy was on the command line: with --via it wins over the address the login node
  // reports.
  bool proxy_given = false;
  bool tls = false;  // TLS to the proxy port
  std::string ca;    // CA certificate for --tls; empty: see ca_trust.h
  // --tls: the SHA-256 fingerprint the proxy's CA must have (ParseCaFingerprint's forms).
  std::string ca_fingerprint;
  // Where the secret comes from without --via: a file, "-" for stdin; empty: $BROKER_SECRET,
  // else the daemon on this host.
  std::string secret_file;
  // Also print the URL with ?token=<secret> once listening (stdout, never logged).
  bool token_url = false;
  // The plain path to a proxy address that is not loopback (the secret crosses the network in
  // clear): refused unless this is set.
  bool insecure_plain = false;
};

// In listen mode only the user running `connect` is served, root included (tunnels carry that
// user's secret): each connection from this host is traced to the socket's owner (sock_diag)
// and closed unless it is the same uid. A listen address that is not loopback is refused
// unless `allow_remote`, since connections from other hosts cannot be traced. `unix:PATH`
// creates a socket of mode 0600 in a directory that must belong to the user and be closed to
// everyone else, serves connections of the same uid only (SO_PEERCRED), and removes the socket
// when it stops.
//
// The plain path (neither --tls nor --via) sends the job's secret in clear, so it goes only to
// a loopback proxy address (e.g. the local end of an `ssh -L` to the login node) unless
// `insecure_plain`.
//
// When the proxy refuses a connection with "ERR denied" (the job was saved again, so its secret
// changed) or "ERR busy" (what a wrong secret gets while the job is throttled: a stale secret
// throttles the job by itself), the secret is fetched once more, the same way as at the start (on
// the thread pool, bounded), and that connection is tried once more with the bytes it had sent;
// connections refused meanwhile wait for the same answer. If the job is gone (NotFound), `connect`
// stops with "job J is no longer registered". If the broker gives the same secret, the refusal is
// reported and the connection closed, with no further retry; `connect` keeps serving.
//
// The job's secret: with --via, from the login node's `load` over SSH, which also reports
// where its proxy listens (the tunnels dial that address, as seen from the login node, through
// the SSH session; `--tls` dials the login host at that port, a wildcard listen address
// standing for the host reached by SSH) and its CA's fingerprint. Without --via:
// `secret_file` (a regular file no one else can read, or stdin), else $BROKER_SECRET, else
// the daemon on this host; the secret never goes on the command line. With none of them,
// an error saying these ways.
//
// Once listening on TCP, prints the URL to open (http://ADDR/), and with `token_url` the same
// with ?token=<secret> (for a service that uses the job's secret as its token).
//
// Runs until SIGINT/SIGTERM (listen mode), until the stdio tunnel ends, or until the job is
// gone. With `remote` (the
// client is the login node over SSH), the secret is loaded through that SSH session and the
// same session then carries every tunnel as a direct-tcpip channel; the session's failure
// ends the command.
Status RunConnect(const Config& config, BrokerClient* client, RemoteClient* remote,
                  const ConnectArgs& args);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_CONNECT_H_
