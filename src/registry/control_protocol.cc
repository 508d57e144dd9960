#include "registry/control_protocol.h"

namespace brokerproxy::registry {
namespace {

struct OpEntry {
  Op op;
  const char* name;
};
constexpr OpEntry kOps[] = {
    {Op::kSave, "save"},   {Op::kLoad, "load"},     {Op::kVerify, "verify"},
    {Op::kQuery, "query"}, {Op::kRemove, "remove"}, {Op::kStats, "stats"},
    {Op::kWait, "wait"},   {Op::kCa, "ca"},         {Op::kEpilog, "epilog"},
};

}  // namespace

const char* OpName(Op op) {
  for (const auto& e : kOps) {
    if (e.op == op) return e.name;
  }
  return "?";
}

namespace {

// Reads an optional integer member (absent: `fallback`).
Status ReadOptionalInt(const cJSON* obj, const char* name, int64_t lo, int64_t hi, int64_t fallback,
                       int64_t* out) {
  if (!cJSON_GetObjectItemCaseSensitive(obj, name)) {
    *out = fallback;
    return Status::OK();
  }
  return ReadInt(obj, name, lo, hi, out);
}

Status ParseFields(const cJSON* obj, Request* req) {
  std::string op;
  BP_RETURN_IF_ERROR(ReadString(obj, "op", /*required=*/true, &op));
  const OpEntry* entry = nullptr;
  for (const auto& e : kOps) {
    if (op == e.name) entry = &e;
  }
  if (!entry) return Status::Corruption("unknown op '" + op.substr(0, 40) + "'");
  req->op = entry->op;
  switch (req->op) {
    case Op::kSave: {
      BP_RETURN_IF_ERROR(CheckFieldNames(obj, {"op", "job", "type", "host", "port", "ttl", "wait",
                                               "replace", "csr", "cert_path", "key_path"}));
      BP_RETURN_IF_ERROR(ReadString(obj, "job", true, &req->job));
      std::string type;
      BP_RETURN_IF_ERROR(ReadString(obj, "type", true, &type));
      auto t = ParseJobType(type);
      if (!t) return Status::Corruption("field 'type' must be \"ssh\" or \"ssl\"");
      req->save.type = *t;
      BP_RETURN_IF_ERROR(ReadString(obj, "host", true, &req->save.host));
      int64_t port = 0, ttl = 0;
      BP_RETURN_IF_ERROR(ReadOptionalInt(obj, "port", 0, 65535, 0, &port));
      BP_RETURN_IF_ERROR(ReadOptionalInt(obj, "ttl", -1, kMaxTtlSeconds, -1, &ttl));
      req->save.port = static_cast<int>(port);
      req->save.ttl = ttl;
      bool wait = false;
      if (cJSON_GetObjectItemCaseSensitive(obj, "wait")) {
        BP_RETURN_IF_ERROR(ReadBool(obj, "wait", &wait));
      }
      req->save.ready = !wait;
      if (cJSON_GetObjectItemCaseSensitive(obj, "replace")) {
        BP_RETURN_IF_ERROR(ReadBool(obj, "replace", &req->save.replace));
      }
      req->save.id = req->job;
      BP_RETURN_IF_ERROR(ReadString(obj, "csr", false, &req->csr));
      BP_RETURN_IF_ERROR(ReadString(obj, "cert_path", false, &req->save.cert_path));
      BP_RETURN_IF_ERROR(ReadString(obj, "key_path", false, &req->save.key_path));
      if (req->save.type == JobType::kSsl) {
        // The broker issues every ssl job a certificate for a key the client made and keeps.
        if (req->csr.empty() || req->save.cert_path.empty() || req->save.key_path.empty()) {
          return Status::Corruption(
              "an ssl job needs 'csr', 'cert_path' and 'key_path' (the client keeps the key)");
        }
      } else if (!req->csr.empty() || !req->save.cert_path.empty() || !req->save.key_path.empty()) {
        return Status::Corruption("'csr', 'cert_path' and 'key_path' are only for ssl jobs");
      }
      return Status::OK();
    }
    case Op::kLoad:
    case Op::kEpilog:
      BP_RETURN_IF_ERROR(CheckFieldNames(obj, {"op", "job"}));
      return ReadString(obj, "job", true, &req->job);
    case Op::kRemove:
      BP_RETURN_IF_ERROR(CheckFieldNames(obj, {"op", "job", "secret"}));
      BP_RETURN_IF_ERROR(ReadString(obj, "job", true, &req->job));
      BP_RETURN_IF_ERROR(ReadString(obj, "secret", false, &req->secret));
      // Present means "only if it still is this secret": an empty one would match nothing.
      if (cJSON_GetObjectItemCaseSensitive(obj, "secret") && req->secret.empty()) {
        return Status::Corruption("field 'secret' must not be empty");
      }
      return Status::OK();
    case Op::kVerify:
      BP_RETURN_IF_ERROR(CheckFieldNames(obj, {"op", "job", "secret"}));
      BP_RETURN_IF_ERROR(ReadString(obj, "job", true, &req->job));
      return ReadString(obj, "secret", true, &req->secret);
    case Op::kWait:
      BP_RETURN_IF_ERROR(CheckFieldNames(obj, {"op", "job", "timeout"}));
      BP_RETURN_IF_ERROR(ReadString(obj, "job", true, &req->job));
      return ReadInt(obj, "timeout", 0, kMaxWaitMs, &req->timeout_ms);
    case Op::kQuery:
    case Op::kStats:
    case Op::kCa:
      return CheckFieldNames(obj, {"op"});
  }
  return Status::Corruption("unknown op");
}

}  // namespace

Result<Request> ParseRequest(std::string_view line) {
  if (line.size() > kMaxRequestBytes) {
    return Status::InvalidArgument("request longer than " + std::to_string(kMaxRequestBytes) +
                                   " bytes");
  }
  auto json = ParseJson(line, kMaxRequestBytes);
  if (!json.ok()) return Status::InvalidArgument("request: " + json.status().message());
  if (!cJSON_IsObject(json->get())) {
    return Status::InvalidArgument("request: must be a JSON object");
  }
  Request req;
  Status s = ParseFields(json->get(), &req);
  if (!s.ok()) return Status::InvalidArgument("request: " + s.message());
  if (!req.job.empty() || req.op == Op::kSave || req.op == Op::kLoad || req.op == Op::kRemove ||
      req.op == Op::kVerify || req.op == Op::kWait || req.op == Op::kEpilog) {
    if (!ValidJobId(req.job)) {
      return Status::InvalidArgument("request: '" + req.job.substr(0, 80) +
                                     "' is not a valid job id (1-64 of A-Z a-z 0-9 . _ + -)");
    }
  }
  if (req.op == Op::kSave && !ValidHost(req.save.host)) {
    return Status::InvalidArgument("request: '" + req.save.host.substr(0, 80) +
                                   "' is not a valid host");
  }
  return req;
}

std::string EncodeRequest(const Request& req) {
  JsonPtr o = NewObject();
  cJSON_AddStringToObject(o.get(), "op", OpName(req.op));
  switch (req.op) {
    case Op::kSave:
      cJSON_AddStringToObject(o.get(), "job", req.job.c_str());
      cJSON_AddStringToObject(o.get(), "type", JobTypeName(req.save.type));
      cJSON_AddStringToObject(o.get(), "host", req.save.host.c_str());
      cJSON_AddNumberToObject(o.get(), "port", req.save.port);
      cJSON_AddNumberToObject(o.get(), "ttl", static_cast<double>(req.save.ttl));
      cJSON_AddBoolToObject(o.get(), "wait", !req.save.ready);
      if (req.save.replace) cJSON_AddBoolToObject(o.get(), "replace", true);
      if (!req.csr.empty()) cJSON_AddStringToObject(o.get(), "csr", req.csr.c_str());
      if (!req.save.cert_path.empty()) {
        cJSON_AddStringToObject(o.get(), "cert_path", req.save.cert_path.c_str());
      }
      if (!req.save.key_path.empty()) {
        cJSON_AddStringToObject(o.get(), "key_path", req.save.key_path.c_str());
      }
      break;
    case Op::kLoad:
      cJSON_AddStringToObject(o.get(), "job", req.job.c_str());
      break;
    case Op::kRemove:
    case Op::kEpilog:
      cJSON_AddStringToObject(o.get(), "job", req.job.c_str());
      if (!req.secret.empty()) cJSON_AddStringToObject(o.get(), "secret", req.secret.c_str());
      break;
    case Op::kVerify:
      cJSON_AddStringToObject(o.get(), "job", req.job.c_str());
      cJSON_AddStringToObject(o.get(), "secret", req.secret.c_str());
      break;
    case Op::kWait:
      cJSON_AddStringToObject(o.get(), "job", req.job.c_str());
      cJSON_AddNumberToObject(o.get(), "timeout", static_cast<double>(req.timeout_ms));
      break;
    case Op::kQuery:
    case Op::kStats:
    case Op::kCa:
      break;
  }
  return PrintJson(o.get());
}

std::string EncodeOk(JsonPtr body) {
  JsonPtr o = NewObject();
  cJSON_AddBoolToObject(o.get(), "ok", true);
  if (body) {
    // Move every member of `body` into the reply.
    while (cJSON* item = body->child) {
      cJSON_DetachItemViaPointer(body.get(), item);
      cJSON_AddItemToObject(o.get(), item->string, item);
    }
  }
  return PrintJson(o.get());
}

std::string EncodeError(const Status& status) {
  JsonPtr o = NewObject();
  cJSON_AddBoolToObject(o.get(), "ok", false);
  cJSON_AddStringToObject(o.get(), "error", status.message().c_str());
  cJSON_AddStringToObject(o.get(), "code", Status::CodeName(status.code()));
  return PrintJson(o.get());
}

Result<JsonPtr> ParseReply(std::string_view line) {
  auto json = ParseJson(line, kMaxReplyBytes);
  if (!json.ok()) return Status::IOError("malformed reply: " + json.status().message());
  if (!cJSON_IsObject(json->get())) return Status::IOError("malformed reply: not an object");
  const cJSON* ok = cJSON_GetObjectItemCaseSensitive(json->get(), "ok");
  if (!cJSON_IsBool(ok)) return Status::IOError("malformed reply: no 'ok' field");
  if (cJSON_IsTrue(ok)) return json;
  const cJSON* err = cJSON_GetObjectItemCaseSensitive(json->get(), "error");
  const cJSON* code = cJSON_GetObjectItemCaseSensitive(json->get(), "code");
  std::string msg = cJSON_IsString(err) ? err->valuestring : "unknown error";
  auto c = cJSON_IsString(code) ? Status::CodeFromName(code->valuestring) : std::nullopt;
  Status::Code sc = c.value_or(Status::Code::kInternal);
  if (sc == Status::Code::kOk) sc = Status::Code::kInternal;
  return Status::FromCode(sc, msg);
}

}  // namespace brokerproxy::registry
