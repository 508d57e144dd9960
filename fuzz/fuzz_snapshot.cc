// The registry snapshot (registry/snapshot.h): read at start-up from state_dir/registry.json.
// A snapshot that decodes must encode to bytes that decode to the same jobs.

#include <string>
#include <vector>

#include "fuzz.h"
#include "registry/snapshot.h"

using brokerproxy::registry::DecodeSnapshot;
using brokerproxy::registry::EncodeSnapshot;
using brokerproxy::registry::Job;

namespace {

std::string Encode(const std::vector<Job>& jobs) {
  std::vector<const Job*> ptrs;
  for (const Job& j : jobs) ptrs.push_back(&j);
  return EncodeSnapshot(ptrs);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto jobs = DecodeSnapshot(brokerproxy::fuzz::AsText(data, size));
  if (!jobs.ok()) {
    FUZZ_CHECK(!jobs.status().message().empty());
    return 0;
  }
  std::string encoded = Encode(*jobs);
  auto again = DecodeSnapshot(encoded);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(again->size() == jobs->size());
  FUZZ_CHECK(Encode(*again) == encoded);
  return 0;
}
