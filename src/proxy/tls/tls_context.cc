#include "proxy/tls/tls_context.h"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

namespace brokerproxy::proxy {
namespace {

// TLS 1.2: forward secrecy (ECDHE) and AEAD only. TLS 1.3: OpenSSL's default suites (all
// AEAD), with AES-128-GCM preferred over AES-256-GCM: as strong for this purpose and markedly
// cheaper per byte on the proxy (docs/libraries.md, "Memory BIOs (the earlier design)").
constexpr const char* kTls12Ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305";
constexpr const char* kTls13Suites =
    "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384";

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;

// Keys are never encrypted here; without this callback OpenSSL would prompt on the terminal.
int NoPassword(char*, int, int, void*) { return 0; }

BioPtr MemoryBio(std::string_view text) {
  return BioPtr(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

Status ApplyPolicy(SSL_CTX* ctx) {
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) {
    return SslError("setting the minimum TLS version");
  }
  if (SSL_CTX_set_cipher_list(ctx, kTls12Ciphers) != 1) return SslError("setting TLS 1.2 ciphers");
  if (SSL_CTX_set_ciphersuites(ctx, kTls13Suites) != 1) return SslError("setting TLS 1.3 suites");
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET |
                               SSL_OP_CIPHER_SERVER_PREFERENCE);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  return Status::OK();
}

}  // namespace

Status SslError(std::string_view context) {
  std::string msg(context);
  unsigned long e;
  int n = 0;
  while ((e = ERR_get_error()) != 0) {
    if (n++ < 3) {  // the first few say it all; the rest is drained anyway
      const char* reason = ERR_reason_error_string(e);
      msg += ": ";
      msg += reason ? reason : "error " + std::to_string(ERR_GET_REASON(e));
    }
  }
  if (n == 0) msg += ": unknown OpenSSL error";
  return Status::IOError(msg);
}

Result<SslCtxPtr> NewServerContext(const std::string& cert_pem, const std::string& key_pem) {
  ERR_clear_error();
  SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
  if (!ctx) return SslError("SSL_CTX_new");
  BP_RETURN_IF_ERROR(ApplyPolicy(ctx.get()));
  SSL_CTX_set_num_tickets(ctx.get(), 0);
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);

  BioPtr bio = MemoryBio(cert_pem);
  X509Ptr leaf(PEM_read_bio_X509(bio.get(), nullptr, NoPassword, nullptr));
  if (!leaf) return SslError("reading the server certificate");
  if (SSL_CTX_use_certificate(ctx.get(), leaf.get()) != 1) {
    return SslError("using the server certificate");
  }
  // Whatever follows the leaf is its chain.
  while (X509* extra = PEM_read_bio_X509(bio.get(), nullptr, NoPassword, nullptr)) {
    if (SSL_CTX_add0_chain_cert(ctx.get(), extra) != 1) {
      X509_free(extra);
      return SslError("adding a chain certificate");
    }
  }
  ERR_clear_error();  // the end of the PEM text reads as an error
  auto key = ParsePrivateKeyPem(key_pem);
  if (!key.ok()) return key.status();
  if (SSL_CTX_use_PrivateKey(ctx.get(), key->get()) != 1) return SslError("using the server key");
  if (SSL_CTX_check_private_key(ctx.get()) != 1) {
    return SslError("the server key does not match its certificate");
  }
  return ctx;
}

Result<SslCtxPtr> NewClientContext(const std::string& ca_pem) {
  ERR_clear_error();
  SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx) return SslError("SSL_CTX_new");
  BP_RETURN_IF_ERROR(ApplyPolicy(ctx.get()));
  X509_STORE* store = SSL_CTX_get_cert_store(ctx.get());
  BioPtr bio = MemoryBio(ca_pem);
  int added = 0;
  while (X509* ca = PEM_read_bio_X509(bio.get(), nullptr, NoPassword, nullptr)) {
    int ok = X509_STORE_add_cert(store, ca);
    X509_free(ca);
    if (ok != 1) return SslError("adding a CA certificate");
    ++added;
  }
  ERR_clear_error();
  if (added == 0) return Status::InvalidArgument("no CA certificate (PEM) found");
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  return ctx;
}

Status SetClientPeerName(SSL* ssl, const std::string& host) {
  ERR_clear_error();
  unsigned char addr[16];
  bool is_ip =
      inet_pton(AF_INET, host.c_str(), addr) == 1 || inet_pton(AF_INET6, host.c_str(), addr) == 1;
  if (is_ip) {
    if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host.c_str()) != 1) {
      return SslError("setting the expected server address");
    }
    return Status::OK();
  }
  X509_VERIFY_PARAM_set_hostflags(SSL_get0_param(ssl), X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  if (SSL_set1_host(ssl, host.c_str()) != 1) return SslError("setting the expected server name");
  if (SSL_set_tlsext_host_name(ssl, host.c_str()) != 1) return SslError("setting SNI");
  return Status::OK();
}

Result<X509Ptr> ParseCertificatePem(std::string_view pem) {
  ERR_clear_error();
  BioPtr bio = MemoryBio(pem);
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, NoPassword, nullptr));
  if (!cert) return SslError("reading a PEM certificate");
  return cert;
}

Result<EvpPkeyPtr> ParsePrivateKeyPem(std::string_view pem) {
  ERR_clear_error();
  BioPtr bio = MemoryBio(pem);
  EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassword, nullptr));
  if (!key) return SslError("reading a PEM private key");
  return key;
}

Result<std::string> CertificateToPem(X509* cert) {
  ERR_clear_error();
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) return SslError("writing a certificate");
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

}  // namespace brokerproxy::proxy
