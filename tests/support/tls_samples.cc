#include "support/tls_samples.h"

#include <openssl/bio.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cstdint>

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

std::string PadClientHello(const std::string& hello, size_t size) {
  std::string hs = hello.substr(5);
  auto u8 = [&hs](size_t at) { return static_cast<size_t>(static_cast<uint8_t>(hs[at])); };
  // type(1) length(3) version(2) random(32) session_id<1> cipher_suites<2> compression<1>
  size_t at = 4 + 2 + 32;
  at += 1 + u8(at);
  at += 2 + ((u8(at) << 8) | u8(at + 1));
  at += 1 + u8(at);
  size_t extensions = (u8(at) << 8) | u8(at + 1);
  size_t pad = size - hs.size() - 4;
  hs += std::string{0, 21, static_cast<char>(pad >> 8), static_cast<char>(pad & 0xff)};
  hs += std::string(pad, '\0');
  extensions += 4 + pad;
  hs[at] = static_cast<char>(extensions >> 8);
  hs[at + 1] = static_cast<char>(extensions & 0xff);
  size_t body = hs.size() - 4;
  hs[1] = static_cast<char>(body >> 16);
  hs[2] = static_cast<char>((body >> 8) & 0xff);
  hs[3] = static_cast<char>(body & 0xff);
  return hs;
}

}  // namespace brokerproxy::testing
