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
    {Op::kWait, "wait"},   {Op::kCa, "ca"},
};

constexpr int64_t kMaxTtlSeconds = int64_t{10} * 365 * 24 * 3600;
constexpr int64_t kMaxWaitMs = int64_t{24} * 3600 * 1000;

}  // namespace

const char* OpName(Op op) {
  for (const auto& e : kOps) {
    if (e.op == op) return e.name;
  }
  return "?";
}

Result<Request> ParseRequest(std::string_view line) {
  if (line.size() > kMaxRequestBytes) {
    return Status::InvalidArgument("request longer than " + std::to_string(kMaxRequestBytes) +
                                   " bytes");
  }
  auto json = ParseJson(line, kMaxRequestBytes);
  if (!json.ok()) return json.status();
  FieldReader r(json->get(), "request", Status::Code::kInvalidArgument);
  std::string op = r.String("op");
  if (!r.ok()) return r.status();

  Request req;
  bool found = false;
  for (const auto& e : kOps) {
    if (op == e.name) {
      req.op = e.op;
      found = true;
    }
  }
  if (!found) return Status::InvalidArgument("request: unknown op '" + op + "'");

  switch (req.op) {
    case Op::kSave: {
      req.job = r.String("job");
      std::string type = r.String("type");
      req.save.host = r.String("host");
      req.save.port = static_cast<int>(r.Int("port", 0, 65535, 0));
      req.save.ttl = r.Int("ttl", -1, kMaxTtlSeconds, -1);
      req.save.ready = !r.Bool("wait", false);
      if (!r.ok()) break;
      auto t = ParseJobType(type);
      if (!t) {
        r.Fail("field 'type' must be \"ssh\" or \"ssl\"");
        break;
      }
      req.save.type = *t;
      req.save.id = req.job;
      break;
    }
    case Op::kLoad:
    case Op::kRemove:
      req.job = r.String("job");
      break;
    case Op::kVerify:
      req.job = r.String("job");
      req.secret = r.String("secret");
      break;
    case Op::kWait:
      req.job = r.String("job");
      req.timeout_ms = r.Int("timeout", 0, kMaxWaitMs);
      break;
    case Op::kQuery:
    case Op::kStats:
    case Op::kCa:
      break;
  }
  r.RejectUnknown();
  if (!r.ok()) return r.status();
  if (!req.job.empty() && !ValidJobId(req.job)) {
    return Status::InvalidArgument("request: '" + req.job +
                                   "' is not a valid job id (1-64 of A-Z a-z 0-9 . _ -)");
  }
  if (req.op == Op::kSave && !ValidHost(req.save.host)) {
    return Status::InvalidArgument("request: '" + req.save.host + "' is not a valid host");
  }
  return req;
}

std::string EncodeRequest(const Request& req) {
  JsonPtr o(cJSON_CreateObject());
  cJSON_AddStringToObject(o.get(), "op", OpName(req.op));
  switch (req.op) {
    case Op::kSave:
      cJSON_AddStringToObject(o.get(), "job", req.job.c_str());
      cJSON_AddStringToObject(o.get(), "type", JobTypeName(req.save.type));
      cJSON_AddStringToObject(o.get(), "host", req.save.host.c_str());
      cJSON_AddNumberToObject(o.get(), "port", req.save.port);
      cJSON_AddNumberToObject(o.get(), "ttl", static_cast<double>(req.save.ttl));
      cJSON_AddBoolToObject(o.get(), "wait", !req.save.ready);
      break;
    case Op::kLoad:
    case Op::kRemove:
      cJSON_AddStringToObject(o.get(), "job", req.job.c_str());
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
  JsonPtr o(cJSON_CreateObject());
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
  JsonPtr o(cJSON_CreateObject());
  cJSON_AddBoolToObject(o.get(), "ok", false);
  cJSON_AddStringToObject(o.get(), "error", status.message().c_str());
  cJSON_AddStringToObject(o.get(), "code", Status::CodeName(status.code()));
  return PrintJson(o.get());
}

Result<JsonPtr> ParseReply(std::string_view line) {
  auto json = ParseJson(line, kMaxReplyBytes);
  if (!json.ok()) return Status::IOError("malformed reply: " + json.status().message());
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
