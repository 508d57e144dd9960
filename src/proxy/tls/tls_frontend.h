// TLS on the proxy port: the Frontend the sniffer hands connections starting with 0x16 to.
//
//   kHello --SNI <job>.<domain> of an ssl job, not one of the proxy's own names--> kDialing
//     |                                                              --> kPassthrough (splice)
//     |
//     +--SNI <x>.<domain>, not an ssl job nor a proxy name--> alert unrecognized_name
//     |
//     +--any other SNI, or none--> kHandshake (terminate, read "BROKER1 <job> <secret>\n"
//            inside TLS) --secret ok--> kConnecting --> kRelaying (plaintext both ways)
//   every state: deadline, error, close --> closed, counted, logged once
//
// A name under the domain that is no ssl job (a typo, a job that ended) is refused with a TLS
// alert before any certificate is shown: a browser then says the site is unreachable instead
// of offering to click through a name mismatch into the proxy's own endpoint.
//
// The ClientHello is read (consumed, not peeked: a partial record cannot wait in a
// level-triggered socket) into a buffer of at most kMaxClientHelloBuffer bytes, each read fed
// once to a ClientHelloReader (incremental: O(n) however finely the client splits it); the
// sniff deadline (`handshake_timeout`) covers it. Those bytes are then carried forward:
// replayed to the backend ahead of the raw splice, or fed to OpenSSL as the first
// ciphertext.
//
// Passthrough: the proxy cannot see inside, so there is no secret check at the proxy. The
// backend terminates TLS with the certificate the broker issued to the job (its name is bound
// by the broker's CA), and the job's secret is used by the service itself as its access token:
// e.g. `brokerproxy save ssl --secret-env JUPYTER_TOKEN -- jupyter notebook --port={port}
// --NotebookApp.certfile={cert} --NotebookApp.keyfile={certkey} ...` (README.md has the whole
// recipe). Who reaches the port without the token gets the service's login page, nothing more.
//
// Termination: the proxy's own certificate (issued by the same CA at start-up), the same
// preamble parser, Authorize() and replies ("OK\n", "ERR <code>\n") as plain sessions, inside
// TLS; unlike plain preambles this is allowed from any source address, since the secret is
// encrypted. TlsRelay (tls_relay.h) does the memory-BIO work and the backpressure.
//
// Failures (malformed, truncated or oversized ClientHello, a stalled handshake, TLS errors)
// are counted in stats().global().tls_failures and logged once per connection; an unusable
// ClientHello is answered with a plaintext TLS alert before closing.
//
// Ownership: the Proxy owns each TlsConnection; `settings` is shared with the daemon, which
// may swap the server context (a renewed certificate) for later connections. Loop-thread only.

#ifndef BROKERPROXY_PROXY_TLS_TLS_FRONTEND_H_
#define BROKERPROXY_PROXY_TLS_TLS_FRONTEND_H_

#include <memory>
#include <string>
#include <vector>

#include "proxy/server/proxy.h"
#include "proxy/tls/tls_context.h"

namespace brokerproxy::proxy {

struct TlsSettings {
  std::string domain;                    // SNI <job_id>.<domain> selects passthrough; lower-case
  std::vector<std::string> proxy_names;  // DNS names of the proxy's certificate, lower-case
  SslCtxPtr server_ctx;                  // the proxy's certificate, for termination
};

// The frontend to install with proxy->set_frontend(Protocol::kTls, ...).
Frontend NewTlsFrontend(std::shared_ptr<TlsSettings> settings);

// A TLS alert record (plaintext, before any handshake): level fatal, `description`
// (RFC 8446 6: 50 decode_error, 80 internal_error, ...).
std::string TlsAlertRecord(unsigned char description);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TLS_TLS_FRONTEND_H_
