// OpenSSL glue shared by every TLS user in brokerproxy: owners for OpenSSL objects, the one
// error translator (SslError) and the two SSL_CTX profiles (the proxy's server side and
// `connect --tls`'s client side).
//
// Policy, the same for both ends (docs/tls.md): TLS 1.2 minimum; TLS 1.2 only with
// ECDHE key exchange and AEAD ciphers (AES-GCM, CHACHA20-POLY1305); TLS 1.3 with OpenSSL's
// default (all AEAD) suites; no compression, no renegotiation, no session tickets (nothing is
// resumed, and a ticket key would be one more secret to manage); SSL_MODE_RELEASE_BUFFERS so an
// idle connection holds no record buffers; SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER because a write
// OpenSSL did not take is retried from TlsRelay's own copy, not from the first buffer.
//
// Thread safety: an SSL_CTX may be shared by threads once built; an SSL belongs to one thread
// (here: the loop thread).

#ifndef BROKERPROXY_PROXY_TLS_TLS_CONTEXT_H_
#define BROKERPROXY_PROXY_TLS_TLS_CONTEXT_H_

#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <memory>
#include <string>
#include <string_view>

#include "loop/status.h"

namespace brokerproxy::proxy {

// ---- owners: every OpenSSL object gets one the moment it exists ----
struct SslCtxFree {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslFree {
  void operator()(SSL* s) const { SSL_free(s); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct X509ReqFree {
  void operator()(X509_REQ* r) const { X509_REQ_free(r); }
};
struct EvpPkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using SslCtxPtr = std::unique_ptr<SSL_CTX, SslCtxFree>;
using SslPtr = std::unique_ptr<SSL, SslFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;
using X509ReqPtr = std::unique_ptr<X509_REQ, X509ReqFree>;
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyFree>;

// "<context>: <first OpenSSL error reason>[: <next> ...]" as IOError, draining the calling
// thread's OpenSSL error queue (so a later SSL_get_error() does not see stale entries). With an
// empty queue: "<context>: unknown OpenSSL error".
Status SslError(std::string_view context);

// The proxy's server context: the certificate `cert_pem` (leaf first, then any chain) with
// `key_pem`, both PEM text. The key must match the certificate.
Result<SslCtxPtr> NewServerContext(const std::string& cert_pem, const std::string& key_pem);

// A client context that trusts exactly the CA certificates in `ca_pem` (PEM text, one or
// more) and verifies the peer's chain against them. Host names are checked per connection
// (SetClientPeerName).
Result<SslCtxPtr> NewClientContext(const std::string& ca_pem);

// Sets what a client connection verifies the server's certificate against: an IP literal is
// matched to IP subjectAltNames and sends no SNI; a name is matched to DNS subjectAltNames and
// sent as SNI.
Status SetClientPeerName(SSL* ssl, const std::string& host);

// Parses PEM text into a certificate / key (the first one in the text).
Result<X509Ptr> ParseCertificatePem(std::string_view pem);
Result<EvpPkeyPtr> ParsePrivateKeyPem(std::string_view pem);
// PEM text of a certificate.
Result<std::string> CertificateToPem(X509* cert);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_TLS_TLS_CONTEXT_H_
