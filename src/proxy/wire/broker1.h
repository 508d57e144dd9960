// BROKER1: the plain handshake on the proxy port, both ends of it, as pure functions over bytes.
//
//   client -> proxy   "BROKER1 <job_id> <secret>\n"   (an optional '\r' before the newline)
//   proxy  -> client  "OK\n"  then the backend's bytes, or
//                     "ERR denied|unavailable|busy|timeout|bad-request\n" and close
//
// The same line goes inside TLS (`connect --tls`, TLS termination) and inside an SSH
// direct-tcpip channel to the proxy port (`connect --via`). This module is the only place that
// spells the magic and the reply strings: the proxy (server/session.cc, tls/tls_frontend.cc)
// decodes preambles and encodes replies with it, `connect` (proxy/client/tunnel.cc and its paths)
// encodes preambles and decodes replies with it. Every parser here is bounded and incremental (a
// stream split anywhere gives the same verdict), and none keeps a pointer into what it is fed.
//
// Bytes a client pipelines behind its preamble belong to the backend: the preamble parser
// examines nothing past the newline, and the reply parser consumes nothing past it either (the
// backend's first bytes may follow "OK\n" in the same segment).

#ifndef BROKERPROXY_PROXY_WIRE_BROKER1_H_
#define BROKERPROXY_PROXY_WIRE_BROKER1_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "loop/status.h"

namespace brokerproxy::proxy {

// ---- The preamble (client -> proxy) ----

inline constexpr std::string_view kPreambleMagic = "BROKER1 ";
// The longest preamble line accepted, newline included.
inline constexpr size_t kMaxPreambleBytes = 2048;
// A job id: 1 to kMaxJobIdChars of [A-Za-z0-9._-]. A secret: one or more of [0-9a-f].
inline constexpr size_t kMaxJobIdChars = 64;
bool IsJobIdChar(char c);
bool IsSecretChar(char c);

// "BROKER1 <job_id> <secret>\n". Does not check the alphabets: a job id or secret the proxy
// would refuse gets "ERR bad-request" from it, which is the answer the user should see.
std::string EncodePreamble(std::string_view job_id, std::string_view secret);

struct Preamble {
  enum class State { kNeedMore, kDone, kBad };
  State state = State::kNeedMore;
  std::string job_id;
  std::string secret;           // never logged
  size_t length = 0;            // bytes of the line, newline included (kDone)
  const char* error = nullptr;  // why kBad, for the debug log
};

// Reads "BROKER1 <job_id> <secret>\n" (an optional '\r' before the newline is accepted) from the
// start of a byte stream fed in pieces of any size: feed bytes -> verdict. Incremental: each
// byte is examined once, however the line is split, and nothing after the newline is examined.
// Fails as early as possible: a wrong magic, a character outside the job id or secret
// alphabets, or kMaxPreambleBytes without a newline is kBad at once. Pure (no I/O), so it is
// unit-tested and fuzzed on its own.
class PreambleReader {
 public:
  // Examines `bytes`, the next bytes of the stream after all those fed before, and returns the
  // verdict so far. Once it is not kNeedMore it is final: later calls return it and examine
  // nothing. REQUIRES nothing of `bytes`; keeps no pointer into them.
  Preamble::State Feed(std::string_view bytes);
  Preamble::State state() const { return result_.state; }
  // The verdict: job_id, secret and length are set for kDone only, error for kBad only.
  const Preamble& result() const { return result_; }
  // Moves the result out (job_id and secret are left empty here).
  Preamble Take() { return std::move(result_); }

 private:
  enum class Part : uint8_t { kMagic, kJobId, kSecret, kCarriageReturn };
  void Bad(const char* why);

  Preamble result_;
  Part part_ = Part::kMagic;
  size_t pos_ = 0;  // bytes of the stream examined
  std::string job_id_, secret_;
};

// One PreambleReader fed `data` at once: `data` may hold only part of the line, or the line and
// payload after it.
Preamble ParsePreamble(std::string_view data);

// ---- The reply (proxy -> client) ----

// Why the proxy refused a connection, each with its wire word.
enum class ErrorCode { kDenied, kUnavailable, kBusy, kTimeout, kBadRequest };
inline constexpr std::string_view kReplyOk = "OK\n";
// "ERR denied\n", ...
std::string_view ErrorReply(ErrorCode code);
// "denied", ...
const char* ErrorCodeName(ErrorCode code);
// The reply line for `error` (nullopt: "OK\n").
std::string_view EncodeReply(std::optional<ErrorCode> error);

// The longest reply line a client reads, newline included ("ERR unavailable\n" is 16 bytes),
// with room to spare for codes a newer proxy may add.
inline constexpr size_t kMaxReplyLine = 128;

struct Reply {
  enum class Kind { kOk, kError, kUnknown };
  Kind kind = Kind::kUnknown;
  std::optional<ErrorCode> error;  // kError only
  std::string line;                // without the newline (and a '\r' before it), for messages
};

// The reply line as a Reply: "OK", "ERR <code>" with a known code, anything else kUnknown.
// `line` is without its newline; a trailing '\r' is accepted.
Reply ParseReply(std::string_view line);

// Reads the proxy's reply line from the start of a stream fed in pieces of any size. Consumes
// bytes only up to and including the newline: what follows is the backend's.
class ReplyReader {
 public:
  enum class State { kNeedMore, kDone, kBad };
  // Takes the bytes of `bytes` up to and including the first newline (all of them if none) and
  // returns how many it took; 0 once the verdict is final. kBad when kMaxReplyLine bytes came
  // without a newline.
  size_t Feed(std::string_view bytes);
  State state() const { return state_; }
  // REQUIRES: state() == kDone.
  const Reply& reply() const { return reply_; }

 private:
  State state_ = State::kNeedMore;
  std::string line_;
  Reply reply_;
};

// What the reply means for a person: OK for "OK"; else an error naming `job_id` that says
// what to do (PermissionDenied for denied, Unavailable, ResourceExhausted for busy, Timeout,
// InvalidArgument for bad-request, IOError for a line that is no reply).
Status ReplyStatus(const Reply& reply, std::string_view job_id);
// True for the refusals a secret fetched anew may turn around: "ERR denied" (an unknown job or
// a wrong secret) and "ERR busy" (the proxy's answer to a wrong secret while the job or this
// source is throttled, which the failures of a stale secret alone can bring about, as can
// another user's; or a proxy out of room).
bool WorthRefetchingSecret(const Reply& reply);

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_WIRE_BROKER1_H_
