// `connect --tls`: tunnels through the proxy port over TLS, from anywhere.
//
// Per local connection: TCP to the proxy port, a TLS client driven through memory BIOs on the
// connect loop (proxy::TlsRelay, the same class that terminates TLS in the proxy), the proxy's
// certificate verified against the broker CA (`--ca FILE`, or the CA fetched with the `ca`
// op and kept in memory) and against the host name or address we connected to, and only then
// the BROKER1 preamble inside TLS. After "OK" the local side is relayed with the same
// backpressure rules as the proxy's.
//
// The CA also signs job certificates, whose names include backend hosts their users choose;
// so the proxy's certificate must also carry the proxy profile (proxy::IsProxyCertificate)
// before the secret is sent: a job's certificate can never impersonate the proxy.
//
// Ownership as for every ProxyPath (tunnel.h). Loop-thread only.
//
// The CA it trusts is the caller's to find (cli/ca_trust.h).

#ifndef BROKERPROXY_PROXY_CLIENT_TLS_PATH_H_
#define BROKERPROXY_PROXY_CLIENT_TLS_PATH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/loop.h"
#include "loop/reactor.h"
#include "proxy/client/tunnel.h"
#include "proxy/tls/tls_context.h"

namespace brokerproxy::proxy::client {

// `ctx`: a client context from proxy::NewClientContext(ca_pem).
std::unique_ptr<ProxyPath> NewTlsPath(loop::Reactor* reactor, proxy::SslCtxPtr ctx,
                                      std::string host, int port, std::string job,
                                      std::string secret, int64_t handshake_timeout_ms);

}  // namespace brokerproxy::proxy::client

#endif  // BROKERPROXY_PROXY_CLIENT_TLS_PATH_H_
