#include "registry/json.h"

#include <cmath>

#include "registry/secret.h"

namespace brokerproxy::registry {

Result<JsonPtr> ParseJson(std::string_view text, size_t max_bytes) {
  if (text.size() > max_bytes) {
    return Status::InvalidArgument("JSON text of " + std::to_string(text.size()) +
                                   " bytes exceeds the limit of " + std::to_string(max_bytes));
  }
  const char* end = nullptr;
  JsonPtr json(cJSON_ParseWithLengthOpts(text.data(), text.size(), &end, false));
  if (!json) {
    size_t at = end ? static_cast<size_t>(end - text.data()) : 0;
    return Status::InvalidArgument("malformed JSON at byte " + std::to_string(at));
  }
  // Only whitespace may follow the value.
  for (const char* p = end; p < text.data() + text.size(); ++p) {
    if (*p != ' ' && *p != '\t' && *p != '\r' && *p != '\n') {
      return Status::InvalidArgument("trailing bytes after JSON value at byte " +
                                     std::to_string(p - text.data()));
    }
  }
  return json;
}

std::string PrintJson(const cJSON* json) {
  char* text = cJSON_PrintUnformatted(json);
  if (!text) return "null";
  std::string out(text);
  cJSON_free(text);
  return out;
}

FieldReader::FieldReader(const cJSON* object, std::string context, Status::Code code)
    : object_(object), context_(std::move(context)), code_(code) {
  if (!cJSON_IsObject(object_)) Fail("expected a JSON object");
}

void FieldReader::Fail(const std::string& what) {
  if (status_.ok()) status_ = Status::FromCode(code_, context_ + ": " + what);
}

const cJSON* FieldReader::Member(const char* name, bool required) {
  if (!status_.ok()) return nullptr;
  seen_.emplace_back(name);
  const cJSON* m = cJSON_GetObjectItemCaseSensitive(object_, name);
  if (!m && required) Fail(std::string("field '") + name + "' is missing");
  return m;
}

std::string FieldReader::String(const char* name, std::optional<std::string_view> fallback) {
  const cJSON* m = Member(name, !fallback.has_value());
  if (!m) return fallback ? std::string(*fallback) : std::string();
  if (!cJSON_IsString(m)) {
    Fail(std::string("field '") + name + "' must be a string");
    return {};
  }
  return m->valuestring;
}

int64_t FieldReader::Int(const char* name, int64_t min, int64_t max,
                         std::optional<int64_t> fallback) {
  const cJSON* m = Member(name, !fallback.has_value());
  if (!m) return fallback.value_or(0);
  double v = cJSON_IsNumber(m) ? m->valuedouble : NAN;
  // Exact integers only; doubles represent every integer up to 2^53 exactly.
  if (!std::isfinite(v) || v != std::floor(v) || v < static_cast<double>(min) ||
      v > static_cast<double>(max)) {
    Fail(std::string("field '") + name + "' must be an integer in " + std::to_string(min) +
         ".." + std::to_string(max));
    return 0;
  }
  return static_cast<int64_t>(v);
}

bool FieldReader::Bool(const char* name, std::optional<bool> fallback) {
  const cJSON* m = Member(name, !fallback.has_value());
  if (!m) return fallback.value_or(false);
  if (!cJSON_IsBool(m)) {
    Fail(std::string("field '") + name + "' must be true or false");
    return false;
  }
  return cJSON_IsTrue(m);
}

void FieldReader::RejectUnknown() {
  if (!status_.ok()) return;
  for (const cJSON* m = object_->child; m; m = m->next) {
    bool known = false;
    for (const auto& s : seen_) known = known || (m->string && s == m->string);
    if (!known) {
      Fail(std::string("unknown field '") + (m->string ? m->string : "") + "'");
      return;
    }
  }
}

JsonPtr JobToJson(const Job& job, SecretField secret) {
  JsonPtr o(cJSON_CreateObject());
  cJSON_AddStringToObject(o.get(), "id", job.id.c_str());
  cJSON_AddStringToObject(o.get(), "type", JobTypeName(job.type));
  cJSON_AddNumberToObject(o.get(), "owner", job.owner);
  cJSON_AddStringToObject(o.get(), "host", job.host.c_str());
  cJSON_AddNumberToObject(o.get(), "port", job.port);
  cJSON_AddBoolToObject(o.get(), "port_allocated", job.port_allocated);
  if (secret == SecretField::kInclude) cJSON_AddStringToObject(o.get(), "secret", job.secret.c_str());
  if (job.type == JobType::kSsl) {
    cJSON_AddStringToObject(o.get(), "cert_path", job.cert_path.c_str());
    cJSON_AddStringToObject(o.get(), "key_path", job.key_path.c_str());
  }
  cJSON_AddNumberToObject(o.get(), "created", static_cast<double>(job.created));
  cJSON_AddNumberToObject(o.get(), "expires", static_cast<double>(job.expires));
  cJSON_AddBoolToObject(o.get(), "ready", job.ready);
  return o;
}

Result<Job> JobFromJson(const cJSON* json, SecretField secret) {
  constexpr int64_t kMaxTime = int64_t{1} << 50;
  FieldReader r(json, "job", Status::Code::kCorruption);
  Job job;
  job.id = r.String("id");
  std::string type = r.String("type");
  job.owner = static_cast<uid_t>(r.Int("owner", 0, 0xfffffffe));
  job.host = r.String("host");
  job.port = static_cast<int>(r.Int("port", 1, 65535));
  job.port_allocated = r.Bool("port_allocated");
  if (secret == SecretField::kInclude) {
    job.secret = r.String("secret");
  } else {
    job.secret = r.String("secret", "");
  }
  job.cert_path = r.String("cert_path", "");
  job.key_path = r.String("key_path", "");
  job.created = r.Int("created", 0, kMaxTime);
  job.expires = r.Int("expires", 0, kMaxTime);
  job.ready = r.Bool("ready");
  r.RejectUnknown();
  if (!r.ok()) return r.status();
  auto t = ParseJobType(type);
  if (!t) return Status::Corruption("job: field 'type' must be \"ssh\" or \"ssl\"");
  job.type = *t;
  if (!ValidJobId(job.id)) return Status::Corruption("job: field 'id' is not a valid job id");
  if (!ValidHost(job.host)) {
    return Status::Corruption("job " + job.id + ": field 'host' is not a valid host");
  }
  if (!(job.secret.empty() && secret == SecretField::kOmit) && !ValidSecretFormat(job.secret)) {
    return Status::Corruption("job " + job.id + ": field 'secret' is not a valid secret");
  }
  if (job.type == JobType::kSsh && (!job.cert_path.empty() || !job.key_path.empty())) {
    return Status::Corruption("job " + job.id + ": an ssh job has no certificate");
  }
  return job;
}

}  // namespace brokerproxy::registry
