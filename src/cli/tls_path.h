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
// Where the CA comes from on a laptop, which has no daemon to ask (`connect` picks the first
// that applies): `--ca FILE`; else the CA in the chain the proxy presents, accepted only if
// its SHA-256 fingerprint is the one the user gave (`--ca-fingerprint`), the one the login
// node's `load` reported over SSH (`--via`), or, with neither, the one pinned for that proxy
// address on first use (CaPins, like ssh's known_hosts). The proxy sends its certificate
// followed by the CA that signed it. FetchProxyChain() reads that chain in a handshake of its
// own that sends nothing; ProxyCaFromChain() picks the CA and checks the proxy's certificate
// against it (chain, name, proxy profile) before anything is pinned; the tunnels then verify
// every connection against that CA as usual. A daemon on this host (the login node) is asked
// for its CA as before.

#ifndef BROKERPROXY_CLI_TLS_PATH_H_
#define BROKERPROXY_CLI_TLS_PATH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cli/tunnel.h"
#include "loop/loop.h"
#include "loop/reactor.h"
#include "proxy/tls/tls_context.h"

namespace brokerproxy::cli {

// "SHA256:<hex>" (what `load` prints), bare hex, or hex with colons (openssl x509
// -fingerprint), in any case: the 64 lower-case hex digits of a SHA-256 fingerprint.
Result<std::string> ParseCaFingerprint(std::string_view text);

// Connects to `host`:`port`, completes a TLS handshake without verifying the server and
// without sending a byte inside it, and returns the chain it presented (its certificate
// first). Blocking, within `timeout_ms`.
Result<std::vector<proxy::X509Ptr>> FetchProxyChain(const std::string& host, int port,
                                                    int64_t timeout_ms);

// The CA certificate (PEM) in `chain` whose fingerprint is `want_sha256` (hex; empty: the
// self-signed CA at the chain's end, for a first use), after checking that the chain's first
// certificate is signed by it, names `host` and is a proxy certificate. `*got_sha256`: the
// fingerprint of the CA it picked or found. PermissionDenied when the chain has no such CA or
// the certificate fails a check.
Result<std::string> ProxyCaFromChain(const std::vector<proxy::X509Ptr>& chain,
                                     const std::string& host, const std::string& want_sha256,
                                     std::string* got_sha256);

// The CA fingerprints pinned on first use, per proxy address ("host:port"): a text file of
// "<host:port> SHA256:<hex>" lines, mode 0600, replaced atomically when a pin is added.
class CaPins {
 public:
  // $XDG_CONFIG_HOME/brokerproxy/known_cas, else ~/.config/brokerproxy/known_cas.
  static std::string DefaultPath();
  explicit CaPins(std::string path) : path_(std::move(path)) {}
  const std::string& path() const { return path_; }
  // The hex fingerprint pinned for `address`, nullopt if none.
  Result<std::optional<std::string>> Lookup(const std::string& address) const;
  // Adds the pin (creating the directories, 0700).
  Status Add(const std::string& address, const std::string& sha256) const;

 private:
  std::string path_;
};

// `ctx`: a client context from proxy::NewClientContext(ca_pem).
std::unique_ptr<ProxyPath> NewTlsPath(loop::Reactor* reactor, proxy::SslCtxPtr ctx,
                                      std::string host, int port, std::string job,
                                      std::string secret, int64_t handshake_timeout_ms);

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_TLS_PATH_H_
