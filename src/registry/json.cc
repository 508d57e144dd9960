#include "registry/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace brokerproxy::registry {
namespace {

// cJSON reports only allocation failures while building; like operator new, we do not continue
// without memory.
template <typename T>
T* CheckAlloc(T* p) {
  if (p == nullptr) {
    std::fputs("brokerproxy: out of memory while building JSON\n", stderr);
    std::abort();
  }
  return p;
}

// A name from untrusted input, made safe to put in a message: short and printable.
std::string Sanitize(const char* text) {
  std::string out;
  for (const char* p = text; *p != '\0' && out.size() < 40; ++p) {
    out += (*p >= 0x20 && *p < 0x7f) ? *p : '?';
  }
  return out;
}

Status Missing(const char* name) {
  return Status::Corruption("missing field '" + std::string(name) + "'");
}

void AddString(cJSON* obj, const char* name, const std::string& value) {
  CheckAlloc(cJSON_AddStringToObject(obj, name, value.c_str()));
}
void AddNumber(cJSON* obj, const char* name, double value) {
  CheckAlloc(cJSON_AddNumberToObject(obj, name, value));
}
void AddBool(cJSON* obj, const char* name, bool value) {
  CheckAlloc(cJSON_AddBoolToObject(obj, name, value));
}

// Stands in for an omitted secret while CheckJob() looks at the other fields.
constexpr char kPlaceholderSecret[] = "00000000000000000000000000000000";

}  // namespace

JsonPtr NewObject() { return JsonPtr(CheckAlloc(cJSON_CreateObject())); }
JsonPtr NewArray() { return JsonPtr(CheckAlloc(cJSON_CreateArray())); }

void Adopt(cJSON* parent, const char* name, JsonPtr child) {
  cJSON_bool added = name ? cJSON_AddItemToObject(parent, name, child.get())
                          : cJSON_AddItemToArray(parent, child.get());
  if (!added) CheckAlloc<cJSON>(nullptr);
  child.release();
}

Result<JsonPtr> ParseJson(std::string_view data, size_t max_bytes) {
  if (data.size() > max_bytes) {
    return Status::Corruption(std::to_string(data.size()) + " bytes, more than the limit of " +
                              std::to_string(max_bytes));
  }
  if (const void* nul = std::memchr(data.data(), '\0', data.size()); nul != nullptr) {
    return Status::Corruption("NUL byte at offset " +
                              std::to_string(static_cast<const char*>(nul) - data.data()));
  }
  // cJSON ends a string at an escaped NUL and drops the rest, so "a\u0000b" would read as "a":
  // refuse it. Backslashes occur only inside strings, and each escapes the next character.
  for (size_t i = 0; i + 1 < data.size(); ++i) {
    if (data[i] != '\\') continue;
    if (data[i + 1] == 'u' && data.substr(i + 2, 4) == "0000") {
      return Status::Corruption("a string contains an escaped NUL (\\u0000) at offset " +
                                std::to_string(i));
    }
    ++i;  // skip the escaped character (it may be another backslash)
  }
  // cJSON rejects trailing garbage only when it sees the terminating NUL inside the buffer.
  const std::string text(data);
  const char* end = nullptr;
  JsonPtr root(cJSON_ParseWithLengthOpts(text.c_str(), text.size() + 1, &end,
                                         /*require_null_terminated=*/true));
  if (!root) {
    std::string where = end != nullptr ? " near byte " + std::to_string(end - text.c_str()) : "";
    return Status::Corruption("not valid JSON" + where);
  }
  return root;
}

std::string PrintJson(const cJSON* json, bool pretty) {
  std::unique_ptr<char, decltype(&cJSON_free)> text(
      CheckAlloc(pretty ? cJSON_Print(json) : cJSON_PrintUnformatted(json)), &cJSON_free);
  return std::string(text.get());
}

Status CheckFieldNames(const cJSON* obj, std::initializer_list<const char*> known) {
  std::vector<bool> seen(known.size());
  for (const cJSON* field = obj->child; field != nullptr; field = field->next) {
    size_t i = 0;
    for (const char* name : known) {
      if (std::strcmp(field->string, name) == 0) break;
      ++i;
    }
    if (i == known.size()) {
      return Status::Corruption("unknown field '" + Sanitize(field->string) + "'");
    }
    if (seen[i]) {
      return Status::Corruption("field '" + Sanitize(field->string) + "' appears twice");
    }
    seen[i] = true;
  }
  return Status::OK();
}

Status ReadInt(const cJSON* obj, const char* name, int64_t lo, int64_t hi, int64_t* out) {
  const cJSON* item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (item == nullptr) return Missing(name);
  const double d = item->valuedouble;
  if (!cJSON_IsNumber(item) || !(d >= static_cast<double>(lo) && d <= static_cast<double>(hi)) ||
      d != std::floor(d)) {
    return Status::Corruption("field '" + std::string(name) + "' must be an integer in " +
                              std::to_string(lo) + ".." + std::to_string(hi));
  }
  *out = static_cast<int64_t>(d);
  return Status::OK();
}

Status ReadString(const cJSON* obj, const char* name, bool required, std::string* out) {
  const cJSON* item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (item == nullptr) {
    out->clear();
    return required ? Missing(name) : Status::OK();
  }
  if (!cJSON_IsString(item)) {
    return Status::Corruption("field '" + std::string(name) + "' must be a string");
  }
  *out = item->valuestring;
  return Status::OK();
}

Status ReadBool(const cJSON* obj, const char* name, bool* out) {
  const cJSON* item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (item == nullptr) return Missing(name);
  if (!cJSON_IsBool(item)) {
    return Status::Corruption("field '" + std::string(name) + "' must be true or false");
  }
  *out = cJSON_IsTrue(item);
  return Status::OK();
}

JsonPtr JobToJson(const Job& job, SecretField secret, std::optional<JobState> state) {
  JsonPtr obj = NewObject();
  AddString(obj.get(), "id", job.id);
  AddString(obj.get(), "type", JobTypeName(job.type));
  AddNumber(obj.get(), "owner", static_cast<double>(job.owner));
  AddString(obj.get(), "host", job.host);
  AddNumber(obj.get(), "port", job.port);
  AddBool(obj.get(), "port_allocated", job.port_allocated);
  if (secret == SecretField::kInclude) AddString(obj.get(), "secret", job.secret);
  if (job.type == JobType::kSsl) {
    AddString(obj.get(), "cert_path", job.cert_path);
    AddString(obj.get(), "key_path", job.key_path);
  }
  AddNumber(obj.get(), "created", static_cast<double>(job.created));
  AddNumber(obj.get(), "expires", static_cast<double>(job.expires));
  if (state) {
    AddBool(obj.get(), "ready", *state == JobState::kReady);
    AddString(obj.get(), "state", JobStateName(*state));
  } else {
    AddBool(obj.get(), "ready", job.ready);
  }
  return obj;
}

Status JobFromJson(const cJSON* obj, SecretField secret, Job* job, JobState* state) {
  if (!cJSON_IsObject(obj)) return Status::Corruption("must be a JSON object");
  // The names a record may have: "secret" only with kInclude, "state" only in replies (a name
  // left out is replaced by a second "ready", which adds nothing).
  const char* secret_name = secret == SecretField::kInclude ? "secret" : "ready";
  const char* state_name = state != nullptr ? "state" : "ready";
  // Replies also say when the job was last in use (read by their callers, not here).
  const char* last_active_name = state != nullptr ? "last_active" : "ready";
  const char* idle_name = state != nullptr ? "idle" : "ready";
  BP_RETURN_IF_ERROR(CheckFieldNames(
      obj, {"id", "type", "owner", "host", "port", "port_allocated", secret_name, "cert_path",
            "key_path", "created", "expires", "ready", state_name, last_active_name, idle_name}));
  BP_RETURN_IF_ERROR(ReadString(obj, "id", /*required=*/true, &job->id));
  std::string type;
  BP_RETURN_IF_ERROR(ReadString(obj, "type", /*required=*/true, &type));
  std::optional<JobType> parsed_type = ParseJobType(type);
  if (!parsed_type) return Status::Corruption("field 'type' must be \"ssh\" or \"ssl\"");
  job->type = *parsed_type;
  int64_t owner = 0;
  // uid_t(-1) means "no user" to the kernel, so no job can belong to it.
  BP_RETURN_IF_ERROR(
      ReadInt(obj, "owner", 0, std::numeric_limits<uid_t>::max() - int64_t{1}, &owner));
  job->owner = static_cast<uid_t>(owner);
  BP_RETURN_IF_ERROR(ReadString(obj, "host", /*required=*/true, &job->host));
  int64_t port = 0;
  BP_RETURN_IF_ERROR(ReadInt(obj, "port", 1, 65535, &port));
  job->port = static_cast<int>(port);
  BP_RETURN_IF_ERROR(ReadBool(obj, "port_allocated", &job->port_allocated));
  if (secret == SecretField::kInclude) {
    BP_RETURN_IF_ERROR(ReadString(obj, "secret", /*required=*/true, &job->secret));
  } else {
    job->secret = kPlaceholderSecret;
  }
  BP_RETURN_IF_ERROR(ReadString(obj, "cert_path", /*required=*/false, &job->cert_path));
  BP_RETURN_IF_ERROR(ReadString(obj, "key_path", /*required=*/false, &job->key_path));
  BP_RETURN_IF_ERROR(ReadInt(obj, "created", 0, kMaxJobTime, &job->created));
  BP_RETURN_IF_ERROR(ReadInt(obj, "expires", 0, kMaxJobTime, &job->expires));
  BP_RETURN_IF_ERROR(ReadBool(obj, "ready", &job->ready));
  if (state != nullptr) {
    *state = job->ready ? JobState::kReady : JobState::kWaiting;
    std::string name;
    BP_RETURN_IF_ERROR(ReadString(obj, "state", /*required=*/false, &name));
    if (!name.empty()) {
      std::optional<JobState> parsed = ParseJobState(name);
      if (!parsed) return Status::Corruption("field 'state' must be ready, waiting or down");
      *state = *parsed;
    }
  }
  Status valid = CheckJob(*job);
  if (secret == SecretField::kOmit) job->secret.clear();
  if (!valid.ok()) return Status::Corruption(valid.message());
  return Status::OK();
}

}  // namespace brokerproxy::registry
