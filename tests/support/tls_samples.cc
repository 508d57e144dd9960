#include "support/tls_samples.h"

#include <openssl/bio.h>
#include <openssl/ssl.h>

#include <algorithm>

namespace brokerproxy::testing {

std::string CaptureClientHello(const char* sni, int max_version) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (max_version) SSL_CTX_set_max_proto_version(ctx, max_version);
  SSL* ssl = SSL_new(ctx);
  BIO* rbio = BIO_new(BIO_s_mem());
  BIO* wbio = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl, rbio, wbio);  // the SSL owns both BIOs now
  SSL_set_connect_state(ssl);
  if (sni) SSL_set_tlsext_host_name(ssl, sni);
  SSL_do_handshake(ssl);  // writes the hello, then wants to read
  char* data = nullptr;
  long len = BIO_get_mem_data(wbio, &data);
  std::string out(data, static_cast<size_t>(len));
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  return out;
}

std::string FragmentHandshake(const std::string& handshake, size_t size) {
  std::string out;
  for (size_t off = 0; off < handshake.size(); off += size) {
    size_t n = std::min(size, handshake.size() - off);
    out += std::string{22, 3, 1, static_cast<char>(n >> 8), static_cast<char>(n & 0xff)};
    out += handshake.substr(off, n);
  }
  return out;
}

}  // namespace brokerproxy::testing
