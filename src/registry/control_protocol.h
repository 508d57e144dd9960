// The control API's wire format: one JSON object per line each way (README.md, "How it works").
//
//   request:  {"op":"save","job":"12345","type":"ssh","host":"node7","port":0,"ttl":3600,
//              "wait":true,"replace":true}
//             "replace" (default false): the caller's existing entry of this id may be replaced;
//             without it a save of an id that exists is refused (AlreadyExists), so a second
//             service of a job needs its own id (save --name). Root over another user's entry
//             needs it too
//             ssl jobs add {"csr":"<PEM>","cert_path":"/abs/J.crt","key_path":"/abs/J.key"}:
//             the key stays with the client, the broker signs the CSR (proxy/tls/certs.h) and the
//             reply adds "cert_pem" and "ca_pem"; the paths are where the client keeps them
//             {"op":"load"|"remove","job":"12345"}
//             {"op":"remove","job":"12345","secret":"<hex>"}: removes only if the stored
//             secret still is this one (constant-time compare), i.e. only the entry that the
//             save which returned it made; a newer save of the id (a new secret) is left in
//             place and the reply is AlreadyExists. Exec mode's cleanup sends it
//             {"op":"verify","job":"12345","secret":"<hex>"}
//             {"op":"wait","job":"12345","timeout":120000}     (milliseconds)
//             {"op":"query"} {"op":"stats"} {"op":"ca"}
//             {"op":"epilog","job":"12345"}   (root and [scheduler] admin_uids: the job ended)
//             (a save's "wait" is kept for older clients: every saved job starts waiting and
//             is probed, broker.h; the client waits with a "wait" op)
//   reply:    {"ok":true, ...op-specific fields}; a job is an object with "state" ("ready",
//             "waiting" or "down") and "ready" (state == "ready")
//             {"ok":false,"error":"<one line for a person>","code":"<Status code name>"}
//
// A pure codec: no I/O, no registry access, so it is unit-tested and fuzzed on its own. The
// CLI's --json output is exactly the reply object, which is also what `--via` reads back
// from the login node.

#ifndef BROKERPROXY_REGISTRY_CONTROL_PROTOCOL_H_
#define BROKERPROXY_REGISTRY_CONTROL_PROTOCOL_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "loop/status.h"
#include "registry/json.h"
#include "registry/registry.h"

namespace brokerproxy::registry {

// Longest request or reply line accepted (a reply listing many jobs can be long, a request
// cannot).
inline constexpr size_t kMaxRequestBytes = 32 * 1024;
inline constexpr size_t kMaxReplyBytes = 64u << 20;
// Bounds of a save's "ttl" (seconds) and a wait's "timeout" (milliseconds).
inline constexpr int64_t kMaxTtlSeconds = int64_t{10} * 365 * 24 * 3600;
inline constexpr int64_t kMaxWaitMs = int64_t{24} * 3600 * 1000;

enum class Op { kSave, kLoad, kVerify, kQuery, kRemove, kStats, kWait, kCa, kEpilog };

const char* OpName(Op op);

struct Request {
  Op op = Op::kQuery;
  std::string job;         // load, verify, remove, wait, epilog; save: the id to save
  SaveRequest save;        // save (save.id == job)
  std::string secret;      // verify; remove: only if it is still this (empty: any); never logged
  std::string csr;         // save of an ssl job: PEM certificate signing request
  int64_t timeout_ms = 0;  // wait
};

// Strict: unknown ops, missing or mistyped fields and unknown fields are InvalidArgument with
// a message naming the field. `line` excludes the newline.
Result<Request> ParseRequest(std::string_view line);
// The request as one line, without the newline.
std::string EncodeRequest(const Request& request);

// {"ok":true} plus the members of `body` (moved in), as one line without the newline.
std::string EncodeOk(JsonPtr body);
std::string EncodeError(const Status& status);

// A reply line: the object if "ok" is true, else the Status it carries.
Result<JsonPtr> ParseReply(std::string_view line);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_CONTROL_PROTOCOL_H_
