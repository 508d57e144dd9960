// Micro-benchmarks of the ClientHello parser that routes TLS by server name without
// terminating it (proxy/client_hello.h): a real OpenSSL first flight, whole and split into
// small records, and garbage that must be refused at once. Each iteration checks the result.

#include <benchmark/benchmark.h>
#include <openssl/bio.h>
#include <openssl/ssl.h>

#include <string>

#include "proxy/client_hello.h"

namespace brokerproxy::proxy {
namespace {

// The first flight of an OpenSSL client offering TLS 1.2 and 1.3, with `sni`.
std::string RealClientHello(const char* sni) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL* ssl = SSL_new(ctx);
  BIO* rbio = BIO_new(BIO_s_mem());
  BIO* wbio = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl, rbio, wbio);
  SSL_set_connect_state(ssl);
  SSL_set_tlsext_host_name(ssl, sni);
  SSL_do_handshake(ssl);  // writes the hello, then wants to read
  char* data = nullptr;
  long len = BIO_get_mem_data(wbio, &data);
  std::string out(data, static_cast<size_t>(len));
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  return out;
}

// The same handshake bytes in records of at most `size` bytes each.
std::string Refragment(const std::string& record, size_t size) {
  std::string hs = record.substr(5);
  std::string out;
  for (size_t off = 0; off < hs.size(); off += size) {
    size_t n = std::min(size, hs.size() - off);
    out += std::string{22, 3, 1, static_cast<char>(n >> 8), static_cast<char>(n & 0xff)};
    out += hs.substr(off, n);
  }
  return out;
}

constexpr char kSni[] = "job-1234.localhost";

void ExpectSni(benchmark::State& state, const std::string& bytes) {
  for (auto _ : state) {
    ClientHello h = ParseClientHello(bytes);
    if (h.state != ClientHello::State::kSni || h.sni != kSni) {
      state.SkipWithError("wrong parse");
      break;
    }
    benchmark::DoNotOptimize(h);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes.size()));
}

void BM_ClientHello_OneRecord(benchmark::State& state) { ExpectSni(state, RealClientHello(kSni)); }
BENCHMARK(BM_ClientHello_OneRecord);

void BM_ClientHello_64ByteRecords(benchmark::State& state) {
  ExpectSni(state, Refragment(RealClientHello(kSni), 64));
}
BENCHMARK(BM_ClientHello_64ByteRecords);

void BM_ClientHello_Garbage(benchmark::State& state) {
  const std::string junk = "\x16\x03\x01\xff\xff" + std::string(64, 'x');
  for (auto _ : state) {
    ClientHello h = ParseClientHello(junk);
    if (h.state != ClientHello::State::kMalformed) {
      state.SkipWithError("garbage accepted");
      break;
    }
    benchmark::DoNotOptimize(h);
  }
}
BENCHMARK(BM_ClientHello_Garbage);

}  // namespace
}  // namespace brokerproxy::proxy
