// Micro-benchmarks of the ClientHello parser that routes TLS by server name without
// terminating it (proxy/client_hello.h): a real OpenSSL first flight, whole and split into
// small records, and garbage that must be refused at once. Each iteration checks the result.

#include <benchmark/benchmark.h>

#include <string>

#include "proxy/client_hello.h"
#include "support/tls_samples.h"

namespace brokerproxy::proxy {
namespace {

using testing::CaptureClientHello;
using testing::FragmentHandshake;

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

void BM_ClientHello_OneRecord(benchmark::State& state) {
  ExpectSni(state, CaptureClientHello(kSni));
}
BENCHMARK(BM_ClientHello_OneRecord);

void BM_ClientHello_64ByteRecords(benchmark::State& state) {
  ExpectSni(state, FragmentHandshake(CaptureClientHello(kSni).substr(5), 64));
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
