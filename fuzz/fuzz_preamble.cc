// The plain preamble "BROKER1 <job> <secret>\n" and the first-byte sniffer
// (proxy/wire/broker1.h, proxy/server/sniffer.h): what any client of the proxy port sends first,
// and what TLS clients send inside TLS. Checks the verdict's contract and that feeding the reader
// in pieces never changes it.

#include <string>

#include "fuzz.h"
#include "proxy/server/sniffer.h"
#include "proxy/wire/broker1.h"

using brokerproxy::proxy::kMaxHttpMethodBytes;
using brokerproxy::proxy::kMaxPreambleBytes;
using brokerproxy::proxy::kPreambleMagic;
using brokerproxy::proxy::ParsePreamble;
using brokerproxy::proxy::Preamble;
using brokerproxy::proxy::PreambleReader;
using brokerproxy::proxy::Protocol;
using brokerproxy::proxy::ProtocolName;
using brokerproxy::proxy::Sniff;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in = brokerproxy::fuzz::AsText(data, size);
  Protocol sniffed = Sniff(in);
  FUZZ_CHECK(ProtocolName(sniffed) != nullptr);
  // More bytes never change a verdict, and "need more" ends within an HTTP method's length.
  FUZZ_CHECK(sniffed != Protocol::kNeedMore || size < kMaxHttpMethodBytes);
  for (size_t k = 0; k < size && k <= kMaxHttpMethodBytes; ++k) {
    Protocol head = Sniff(in.substr(0, k));
    FUZZ_CHECK(head == Protocol::kNeedMore || head == sniffed);
  }

  Preamble p = ParsePreamble(in);
  switch (p.state) {
    case Preamble::State::kNeedMore:
      FUZZ_CHECK(size < kMaxPreambleBytes);
      FUZZ_CHECK(p.job_id.empty() && p.secret.empty() && p.error == nullptr);
      break;
    case Preamble::State::kBad:
      FUZZ_CHECK(p.error != nullptr);
      FUZZ_CHECK(p.job_id.empty() && p.secret.empty());
      break;
    case Preamble::State::kDone: {
      FUZZ_CHECK(p.length <= size && p.length <= kMaxPreambleBytes);
      FUZZ_CHECK(!p.job_id.empty() && p.job_id.size() <= 64 && !p.secret.empty());
      for (char c : p.secret) FUZZ_CHECK((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
      // The line is exactly what was parsed, with an optional '\r'.
      std::string line = std::string(kPreambleMagic) + p.job_id + " " + p.secret;
      std::string_view got = in.substr(0, p.length);
      FUZZ_CHECK(got == line + "\n" || got == line + "\r\n");
      // The line alone says the same; one byte less needs more.
      Preamble alone = ParsePreamble(got);
      FUZZ_CHECK(alone.state == Preamble::State::kDone && alone.length == p.length);
      FUZZ_CHECK(alone.job_id == p.job_id && alone.secret == p.secret);
      FUZZ_CHECK(ParsePreamble(got.substr(0, p.length - 1)).state == Preamble::State::kNeedMore);
      break;
    }
  }

  // Fed in pieces whose sizes the input picks: the same verdict.
  PreambleReader reader;
  uint32_t state = static_cast<uint32_t>(size) * 2654435761u + (size ? data[0] : 0);
  for (size_t off = 0; off <= size;) {
    state = state * 1103515245u + 12345u;
    size_t n = 1 + (state >> 16) % 13;
    reader.Feed(in.substr(off, n));
    off += n;
  }
  const Preamble& split = reader.result();
  FUZZ_CHECK(split.state == p.state && split.length == p.length);
  FUZZ_CHECK(split.job_id == p.job_id && split.secret == p.secret);
  return 0;
}
