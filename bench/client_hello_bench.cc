// Micro-benchmarks of the ClientHello parser that routes TLS by server name without
// terminating it (proxy/tls/client_hello.h): a real OpenSSL first flight, whole and split into
// small records, the largest hello split the worst way an unauthenticated client can split it,
// and garbage that must be refused at once. Each iteration checks the result.

#include <benchmark/benchmark.h>

#include <string>

#include "proxy/tls/client_hello.h"
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

// The costliest hello anyone who reaches the port can send: padded to fill the proxy's buffer,
// in 1-byte records, read 6 bytes (one record) at a time as a paced sender makes the proxy do.
// Each byte is examined once, so this stays within a small factor of the 64-byte case per byte.
void BM_ClientHello_16KiBInOneByteRecordsReadOneAtATime(benchmark::State& state) {
  const std::string stream =
      FragmentHandshake(testing::PadClientHello(CaptureClientHello(kSni), 2730), 1);
  for (auto _ : state) {
    ClientHelloReader reader;
    for (size_t off = 0; off < stream.size() && !reader.failed(); off += 6) {
      reader.Feed(std::string_view(stream).substr(off, 6));
    }
    if (reader.verdict() != ClientHelloReader::Verdict::kSni || reader.sni() != kSni) {
      state.SkipWithError("wrong parse");
      break;
    }
    benchmark::DoNotOptimize(reader);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * stream.size()));
}
BENCHMARK(BM_ClientHello_16KiBInOneByteRecordsReadOneAtATime);

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
