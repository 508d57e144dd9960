// The daemon's TLS material: the broker CA, the proxy's own certificate, and the hook with
// which `save ssl` gets its certificates.
//
// On every start the daemon loads the CA from [tls] ca_cert / ca_key (default
// <state_dir>/ca.pem and ca-key.pem), creating it there on first start; a restart keeps the
// same CA, so certificates already issued and CA files already given to browsers stay valid.
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

#include "cli/options.h"
#include "loop/loop.h"
#include "loop/status.h"
#include "proxy/certs.h"
#include "registry/broker.h"

namespace brokerproxy::cli {

struct DaemonTls {
  std::shared_ptr<const proxy::CertificateAuthority> ca;
  proxy::KeyAndCert server;  // the proxy's certificate and key, PEM
  int64_t server_seconds_left = 0;
};

// The names of the proxy's certificate (blocking: host name lookups).
proxy::LeafProfile ProxyCertProfile(const Config& config);

// Loads or creates the CA and the proxy certificate (blocking). `server_cert_path` and
// `server_key_path` default to <state_dir>/server.pem and server-key.pem.
Result<DaemonTls> SetUpDaemonTls(const Config& config);

// Renews the proxy certificate if it is within a third of its validity of expiring
// (blocking). nullopt when nothing changed.
Result<std::optional<proxy::KeyAndCert>> RenewServerCertIfDue(
    const Config& config, const proxy::CertificateAuthority& ca);

// The Broker's CertIssuer: resolves the job's backend host (loop::Resolve: bounded) and signs
// the CSR on the thread pool, with subjectAltNames from proxy::JobLeafProfile. Dropping the
// token while the host is resolved cancels; once signing started, it reports when done.
registry::Broker::CertIssuer MakeCertIssuer(loop::Loop* loop,
                                            std::shared_ptr<const proxy::CertificateAuthority> ca,
                                            std::string domain, int days);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_DAEMON_TLS_H_
