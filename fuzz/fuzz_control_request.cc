// The control socket's request line (registry/control_protocol.h): any local user can send
// one to the daemon, which runs as root. A request that parses must survive its own encoding
// unchanged; the reply parser (the CLI reads replies, also from `--via` hosts) must not crash.

#include <string>

#include "fuzz.h"
#include "registry/control_protocol.h"

using brokerproxy::registry::EncodeRequest;
using brokerproxy::registry::ParseReply;
using brokerproxy::registry::ParseRequest;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view line = brokerproxy::fuzz::AsText(data, size);
  auto request = ParseRequest(line);
  if (request.ok()) {
    std::string encoded = EncodeRequest(*request);
    auto again = ParseRequest(encoded);
    FUZZ_CHECK(again.ok());
    FUZZ_CHECK(EncodeRequest(*again) == encoded);
    FUZZ_CHECK(again->op == request->op && again->job == request->job);
  } else {
    FUZZ_CHECK(!request.status().message().empty());
  }
  auto reply = ParseReply(line);
  if (!reply.ok()) FUZZ_CHECK(!reply.status().message().empty());
  return 0;
}
