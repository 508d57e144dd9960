// cJSON ownership and the JSON form of a job, shared by the snapshot file, the control API and
// the CLI's --json output, so a job has exactly one JSON shape everywhere.

#ifndef BROKERPROXY_REGISTRY_JSON_H_
#define BROKERPROXY_REGISTRY_JSON_H_

#include <cJSON.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/status.h"
#include "registry/job.h"

namespace brokerproxy::registry {

struct JsonDeleter {
  void operator()(cJSON* j) const { cJSON_Delete(j); }
};
// Every cJSON tree gets an owner the moment it exists.
using JsonPtr = std::unique_ptr<cJSON, JsonDeleter>;

// Parses at most `max_bytes` of JSON text; InvalidArgument with cJSON's position on error.
Result<JsonPtr> ParseJson(std::string_view text, size_t max_bytes);
// Compact one-line text of `json`.
std::string PrintJson(const cJSON* json);

// Reads the members of one JSON object with type and range checks. The first problem is kept
// (later reads return defaults), so parsing code reads straight through and checks status()
// once. Errors carry `code` and name the member: "<context>: field 'port' must be an integer
// in 1..65535".
class FieldReader {
 public:
  FieldReader(const cJSON* object, std::string context, Status::Code code);

  // A string member; required unless a default is given.
  std::string String(const char* name, std::optional<std::string_view> fallback = {});
  // An integer member (exact: 1.5 is refused) within [min, max].
  int64_t Int(const char* name, int64_t min, int64_t max, std::optional<int64_t> fallback = {});
  bool Bool(const char* name, std::optional<bool> fallback = {});
  // Fails if the object has a member that was not read.
  void RejectUnknown();

  const Status& status() const { return status_; }
  bool ok() const { return status_.ok(); }
  void Fail(const std::string& what);

 private:
  const cJSON* Member(const char* name, bool required);

  const cJSON* object_;
  std::string context_;
  Status::Code code_;
  std::vector<std::string> seen_;
  Status status_;
};

enum class SecretField { kOmit, kInclude };

// {"id","type","owner","host","port","port_allocated","secret","cert_path","key_path",
//  "created","expires","ready"}; "secret" only with kInclude, cert/key only for ssl jobs.
JsonPtr JobToJson(const Job& job, SecretField secret);

// The inverse, checking every field (types, ranges, ValidJobId, ValidHost, secret format).
// With kOmit, a missing "secret" is allowed and left empty. Errors are Corruption naming the
// field.
Result<Job> JobFromJson(const cJSON* json, SecretField secret);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_JSON_H_
