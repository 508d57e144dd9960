// ClientHelloReader (proxy/tls/client_hello.h): the first bytes of every TLS connection to the
// proxy port, from anyone who can reach it. Checks the verdict's contract, that splitting the input
// into pieces never changes the verdict, and that the work stays linear.

#include <algorithm>

#include "fuzz.h"
#include "proxy/tls/client_hello.h"

using brokerproxy::proxy::ClientHello;
using brokerproxy::proxy::ClientHelloReader;
using brokerproxy::proxy::kMaxClientHelloBuffer;
using brokerproxy::proxy::ParseClientHello;
using Verdict = ClientHelloReader::Verdict;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in = brokerproxy::fuzz::AsText(data, size);
  size_t examined = std::min(size, kMaxClientHelloBuffer);

  ClientHelloReader whole;
  Verdict v = whole.Feed(in);
  FUZZ_CHECK(v == whole.verdict());
  FUZZ_CHECK(whole.steps() <= 3 * examined + 64);
  FUZZ_CHECK(whole.failed() == (whole.error() != nullptr));
  if (v == Verdict::kSni) {
    const std::string& sni = whole.sni();
    FUZZ_CHECK(!sni.empty() && sni.size() <= 253);
    FUZZ_CHECK(sni.front() != '.' && sni.back() != '.');
    for (char c : sni) {
      FUZZ_CHECK((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
                 c == '_');
    }
  } else {
    FUZZ_CHECK(whole.sni().empty());
  }
  if (v == Verdict::kNeedMore) FUZZ_CHECK(size < kMaxClientHelloBuffer);

  // The same bytes in pieces whose sizes the input picks: same verdict, same name.
  ClientHelloReader split;
  uint32_t state = static_cast<uint32_t>(size) * 2654435761u + (size ? data[size - 1] : 0);
  size_t feeds = 0;
  for (size_t off = 0; off <= size;) {
    state = state * 1103515245u + 12345u;
    size_t n = 1 + (state >> 16) % (state & 0x100 ? 3 : 97);
    split.Feed(in.substr(off, n));
    ++feeds;
    off += n;
  }
  FUZZ_CHECK(split.verdict() == v);
  FUZZ_CHECK(split.sni() == whole.sni());
  FUZZ_CHECK(split.steps() <= 3 * examined + feeds + 64);

  // The whole-buffer form folds the failures into kMalformed.
  ClientHello h = ParseClientHello(in);
  switch (v) {
    case Verdict::kNeedMore:
      FUZZ_CHECK(h.state == ClientHello::State::kNeedMore);
      break;
    case Verdict::kSni:
      FUZZ_CHECK(h.state == ClientHello::State::kSni && h.sni == whole.sni());
      break;
    case Verdict::kNoSni:
      FUZZ_CHECK(h.state == ClientHello::State::kNoSni);
      break;
    case Verdict::kNotTls:
    case Verdict::kMalformed:
    case Verdict::kTooLarge:
      FUZZ_CHECK(h.state == ClientHello::State::kMalformed && h.error != nullptr);
      break;
  }
  return 0;
}
