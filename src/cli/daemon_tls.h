// The daemon's TLS material: the broker CA, the proxy's own certificate, and the hook with
// which `save ssl` gets its certificates.
//
// On every start the daemon loads the CAs from [tls] ca_cert / ca_key (default
// <state_dir>/ca.pem, a bundle with the current CA first, and ca-key.pem), creating them on
// first start; a restart keeps them, so certificates already issued and CA files already given
// to browsers stay valid. The current CA is replaced ahead of its expiry, and at once if it has
// no name constraints (proxy::CaSet); the check runs at start and every few hours.
// The proxy's certificate lives in <state_dir>/server.pem and server-key.pem (0600) and is
// issued anew when missing, not issued by this CA, no longer matching the names below, or
// within a third of its validity of expiring (checked at start and every few hours).
//
// The proxy certificate's names are those a client may use to reach the proxy port: the
// login host's name (and its canonical name), localhost, 127.0.0.1, ::1, the tls_domain, the
// [proxy] listen addresses (every local interface address for a wildcard listen) and
// [client] proxy's host. No wildcard: a job's name must never match the proxy's certificate.
//
// Everything here that blocks (keys, signing, files, DNS) runs on the thread pool.

#ifndef BROKERPROXY_CLI_DAEMON_TLS_H_
#define BROKERPROXY_CLI_DAEMON_TLS_H_

#include <memory>
#include <string>
#include <vector>

#include "cli/options.h"
#include "loop/loop.h"
#include "loop/status.h"
#include "proxy/tls/certs.h"
#include "registry/broker.h"

namespace brokerproxy::cli {

struct DaemonTls {
  std::shared_ptr<proxy::CaSet> cas;
  proxy::KeyAndCert server;  // the proxy's certificate and key, PEM
  int64_t server_seconds_left = 0;
};

// The names of the proxy's certificate (blocking: host name lookups).
proxy::LeafProfile ProxyCertProfile(const Config& config);

// The CA's name constraints: DNS names under `.<tls_domain>`, plus exactly the DNS names and
// addresses of the proxy's certificate `proxy` (which the same CA signs).
proxy::CaConstraints CaConstraintsFor(const Config& config, const proxy::LeafProfile& proxy);

// Loads or creates the CAs (proxy::CaSet: replaced when unconstrained, not covering the
// proxy's names, or due) and the proxy certificate (blocking). The proxy certificate lives in
// <state_dir>/server.pem and server-key.pem.
Result<DaemonTls> SetUpDaemonTls(const Config& config);

// Makes a new CA if one is due (CaSet::Maintain), then renews the proxy certificate if it is
// not issued by the current CA or within a third of its validity of expiring (blocking).
// nullopt when the proxy certificate did not change.
Result<std::optional<proxy::KeyAndCert>> RenewServerCertIfDue(const Config& config,
                                                              proxy::CaSet* cas);

// The Broker's IdCheck: InvalidArgument if <id>.<domain> is one of `proxy_names` (the DNS
// names of the proxy's certificate, lower case), so no job can be given, or route TLS
// connections by, a name of the proxy itself.
Status CheckJobIdAgainstProxyNames(const std::string& id, const std::string& domain,
                                   const std::vector<std::string>& proxy_names);

// The Broker's CertIssuer: signs the CSR on the thread pool with proxy::JobLeafProfile (the
// job's own name only; no DNS look-up).
// The certificate is signed by the current CA, and the reply carries the whole bundle.
registry::Broker::CertIssuer MakeCertIssuer(loop::Loop* loop, std::shared_ptr<proxy::CaSet> cas,
                                            std::string domain, int days);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_DAEMON_TLS_H_
