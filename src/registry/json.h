// cJSON ownership, strict field readers, and the JSON form of a job. Shared by the snapshot
// file, the control API and the CLI's --json output, so a job has one JSON shape everywhere
// and every reader checks fields the same way.

#ifndef BROKERPROXY_REGISTRY_JSON_H_
#define BROKERPROXY_REGISTRY_JSON_H_

#include <cJSON.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "loop/status.h"
#include "registry/job.h"

namespace brokerproxy::registry {

struct JsonDeleter {
  void operator()(cJSON* j) const { cJSON_Delete(j); }
};
// Every cJSON tree gets an owner the moment it exists.
using JsonPtr = std::unique_ptr<cJSON, JsonDeleter>;

// A new object/array; cJSON fails only without memory, and like operator new we then abort.
JsonPtr NewObject();
JsonPtr NewArray();
// Moves `child` into `parent` (an object member named `name`, or an array element if null).
void Adopt(cJSON* parent, const char* name, JsonPtr child);

// Parses exactly one JSON value (whitespace around it allowed) of at most `max_bytes`.
// Corruption saying where it broke.
Result<JsonPtr> ParseJson(std::string_view text, size_t max_bytes);
// Compact (one line) or indented text.
std::string PrintJson(const cJSON* json, bool pretty = false);

// Field readers. Each fails with Corruption naming the field; callers that read untrusted
// requests turn that into InvalidArgument.
//
// Every member of `obj` has a name from `known`, and none appears twice (cJSON would keep both
// and a lookup would silently see only the first).
Status CheckFieldNames(const cJSON* obj, std::initializer_list<const char*> known);
// An exact integer (not 1.5, not 1e400) in lo..hi. REQUIRES |lo|, |hi| < 10^15, so every
// accepted value prints back exactly.
Status ReadInt(const cJSON* obj, const char* name, int64_t lo, int64_t hi, int64_t* out);
// A string; an absent optional one reads as "".
Status ReadString(const cJSON* obj, const char* name, bool required, std::string* out);
Status ReadBool(const cJSON* obj, const char* name, bool* out);

enum class SecretField { kOmit, kInclude };

// {"id","type","owner","host","port","port_allocated","secret","cert_path","key_path",
//  "created","expires","ready"}: "secret" only with kInclude, the paths only for ssl jobs.
// With `state` (replies to clients), "state" is added and "ready" is state == kReady; without
// it (the snapshot), "ready" is the record's own flag.
JsonPtr JobToJson(const Job& job, SecretField secret, std::optional<JobState> state = std::nullopt);

// The inverse, checking every field name, type and range, and the job with CheckJob(). With
// kOmit the secret must be absent (query replies carry none) and is left empty. With `state`
// (replies) a "state" member is allowed and read into it; without one ("ready" only, as older
// daemons reply) it is derived: ready, or else waiting. On failure `job->id` holds whatever id
// was read, for the caller's message.
Status JobFromJson(const cJSON* obj, SecretField secret, Job* job, JobState* state = nullptr);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_JSON_H_
