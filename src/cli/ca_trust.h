// Which CA `connect --tls` trusts for the proxy's certificate (proxy/client/tls_path.h verifies
// every tunnel against it).
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

#ifndef BROKERPROXY_CLI_CA_TRUST_H_
#define BROKERPROXY_CLI_CA_TRUST_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/status.h"
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

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_CA_TRUST_H_
