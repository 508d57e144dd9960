// Micro-benchmarks of the proxy port's first steps: Sniff() on the first byte and
// ParsePreamble() on the BROKER1 line, in the shapes the Session really feeds them (a whole line,
// a line growing one byte per read, garbage). Results are checked inside the timed loop, so a
// benchmark that stops doing the work fails instead of getting faster.

#include <benchmark/benchmark.h>

#include <string>
#include <string_view>

#include "proxy/server/sniffer.h"
#include "proxy/wire/broker1.h"

namespace brokerproxy::proxy {
namespace {

// A realistic preamble: a Slurm-style job id and a 256-bit secret (64 hex digits).
const std::string kJobId = "4242424.notebook";
const std::string kSecret = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const std::string kLine = "BROKER1 " + kJobId + " " + kSecret + "\n";

bool IsDone(const Preamble& p) {
  return p.state == Preamble::State::kDone && p.length == kLine.size() && p.job_id == kJobId &&
         p.secret == kSecret;
}

void BM_ParsePreamble_Complete(benchmark::State& state) {
  for (auto _ : state) {
    Preamble p = ParsePreamble(kLine);
    if (!IsDone(p)) {
      state.SkipWithError("complete preamble not parsed");
      break;
    }
    benchmark::DoNotOptimize(p);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kLine.size()));
}
BENCHMARK(BM_ParsePreamble_Complete);

// The preamble followed by the first bytes of the client's protocol in the same read: only the
// line is taken.
void BM_ParsePreamble_WithPayload(benchmark::State& state) {
  const std::string data = kLine + std::string(1024, 'x');
  for (auto _ : state) {
    Preamble p = ParsePreamble(data);
    if (!IsDone(p)) {
      state.SkipWithError("preamble with payload not parsed");
      break;
    }
    benchmark::DoNotOptimize(p);
  }
}
BENCHMARK(BM_ParsePreamble_WithPayload);

// The worst honest client: one byte per segment. The Session re-parses its accumulated buffer
// after every read, so one complete line costs kLine.size() parses of growing prefixes; this
// measures the whole line's cost.
void BM_ParsePreamble_ByteByByte(benchmark::State& state) {
  const std::string_view line = kLine;
  for (auto _ : state) {
    for (size_t n = 1; n < line.size(); ++n) {
      Preamble p = ParsePreamble(line.substr(0, n));
      if (p.state != Preamble::State::kNeedMore) {
        state.SkipWithError("a strict prefix was not kNeedMore");
        return;
      }
      benchmark::DoNotOptimize(p);
    }
    Preamble p = ParsePreamble(line);
    if (!IsDone(p)) {
      state.SkipWithError("byte-by-byte preamble not parsed");
      break;
    }
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.counters["parses_per_line"] = static_cast<double>(line.size());
}
BENCHMARK(BM_ParsePreamble_ByteByByte);

// Not BROKER1 at all (an HTTP request on the wrong port): rejected on the first bytes.
void BM_ParsePreamble_BadMagic(benchmark::State& state) {
  const std::string data = "GET / HTTP/1.1\r\nHost: example\r\n\r\n";
  for (auto _ : state) {
    Preamble p = ParsePreamble(data);
    if (p.state != Preamble::State::kBad) {
      state.SkipWithError("bad magic accepted");
      break;
    }
    benchmark::DoNotOptimize(p);
  }
}
BENCHMARK(BM_ParsePreamble_BadMagic);

// Wrong only at the very end (an upper-case hex digit in the last position): the most work a
// bad line can cost.
void BM_ParsePreamble_BadSecretAtEnd(benchmark::State& state) {
  std::string data = kLine;
  data[data.size() - 2] = 'F';
  for (auto _ : state) {
    Preamble p = ParsePreamble(data);
    if (p.state != Preamble::State::kBad) {
      state.SkipWithError("bad secret accepted");
      break;
    }
    benchmark::DoNotOptimize(p);
  }
}
BENCHMARK(BM_ParsePreamble_BadSecretAtEnd);

// A line with no newline at the cap: the flood case, kMaxPreambleBytes scanned.
void BM_ParsePreamble_TooLong(benchmark::State& state) {
  const std::string data = "BROKER1 job " + std::string(kMaxPreambleBytes, 'a');
  for (auto _ : state) {
    Preamble p = ParsePreamble(data);
    if (p.state != Preamble::State::kBad) {
      state.SkipWithError("over-long preamble accepted");
      break;
    }
    benchmark::DoNotOptimize(p);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kMaxPreambleBytes));
}
BENCHMARK(BM_ParsePreamble_TooLong);

void SniffCase(benchmark::State& state, std::string_view bytes, Protocol want) {
  for (auto _ : state) {
    benchmark::DoNotOptimize(bytes.data());
    Protocol p = Sniff(bytes);
    if (p != want) {
      state.SkipWithError("wrong protocol");
      break;
    }
    benchmark::DoNotOptimize(p);
  }
}

void BM_Sniff_Plain(benchmark::State& state) { SniffCase(state, kLine, Protocol::kPlain); }
BENCHMARK(BM_Sniff_Plain);

void BM_Sniff_Tls(benchmark::State& state) {
  // The first bytes of a TLS 1.2/1.3 ClientHello record.
  static const unsigned char kHello[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01,
                                         0x00, 0x01, 0xfc, 0x03, 0x03};
  SniffCase(state, std::string_view(reinterpret_cast<const char*>(kHello), sizeof(kHello)),
            Protocol::kTls);
}
BENCHMARK(BM_Sniff_Tls);

void BM_Sniff_Ssh(benchmark::State& state) {
  SniffCase(state, "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", Protocol::kSsh);
}
BENCHMARK(BM_Sniff_Ssh);

void BM_Sniff_Unknown(benchmark::State& state) {
  SniffCase(state, "GET / HTTP/1.1\r\n", Protocol::kUnknown);
}
BENCHMARK(BM_Sniff_Unknown);

void BM_Sniff_Empty(benchmark::State& state) { SniffCase(state, "", Protocol::kNeedMore); }
BENCHMARK(BM_Sniff_Empty);

}  // namespace
}  // namespace brokerproxy::proxy
