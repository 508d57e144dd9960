// The registry snapshot (registry/snapshot.h): read at start-up from state_dir/registry.json.
// A snapshot that decodes must encode to bytes that decode to the same jobs. Mutated input
// almost never carries a matching checksum, so each input is also decoded once more with its
// checksum recomputed: that lets the fuzzer reach the checks of every job's fields.

#include <openssl/evp.h>

#include <string>
#include <vector>

#include "fuzz.h"
#include "registry/json.h"
#include "registry/snapshot.h"

using brokerproxy::registry::DecodeSnapshot;
using brokerproxy::registry::EncodeSnapshot;
using brokerproxy::registry::Job;
using brokerproxy::registry::kMaxSnapshotBytes;
using brokerproxy::registry::ParseJson;
using brokerproxy::registry::PrintJson;

namespace {

std::string Encode(const std::vector<Job>& jobs) {
  std::vector<const Job*> ptrs;
  for (const Job& j : jobs) ptrs.push_back(&j);
  return EncodeSnapshot(ptrs);
}

// `text` with "checksum" set to the SHA-256 of its "jobs" printed compactly (as the snapshot
// format defines it), or "" if it is no JSON object with a jobs member.
std::string WithChecksum(std::string_view text) {
  auto root = ParseJson(text, kMaxSnapshotBytes);
  if (!root.ok() || !cJSON_IsObject(root->get())) return "";
  const cJSON* jobs = cJSON_GetObjectItemCaseSensitive(root->get(), "jobs");
  if (jobs == nullptr) return "";
  std::string compact = PrintJson(jobs);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  FUZZ_CHECK(EVP_Digest(compact.data(), compact.size(), digest, &len, EVP_sha256(), nullptr) == 1);
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) {
    hex += "0123456789abcdef"[digest[i] >> 4];
    hex += "0123456789abcdef"[digest[i] & 0xf];
  }
  cJSON_DeleteItemFromObjectCaseSensitive(root->get(), "checksum");
  cJSON_AddStringToObject(root->get(), "checksum", hex.c_str());
  return PrintJson(root->get());
}

void Check(std::string_view text) {
  auto jobs = DecodeSnapshot(text);
  if (!jobs.ok()) {
    FUZZ_CHECK(!jobs.status().message().empty());
    return;
  }
  std::string encoded = Encode(*jobs);
  auto again = DecodeSnapshot(encoded);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(again->size() == jobs->size());
  FUZZ_CHECK(Encode(*again) == encoded);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text = brokerproxy::fuzz::AsText(data, size);
  Check(text);
  std::string fixed = WithChecksum(text);
  if (!fixed.empty()) Check(fixed);
  return 0;
}
