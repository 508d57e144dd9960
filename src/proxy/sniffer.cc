#include "proxy/sniffer.h"

namespace brokerproxy::proxy {
namespace {

bool IsJobIdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

bool IsHexChar(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

constexpr size_t kMaxJobIdChars = 64;

}  // namespace

Protocol Sniff(std::string_view b) {
  if (b.empty()) return Protocol::kNeedMore;
  switch (static_cast<unsigned char>(b[0])) {
    case 'B':
      return Protocol::kPlain;
    case 0x16:  // TLS ContentType handshake
      return Protocol::kTls;
    case 'S':
      return Protocol::kSsh;
    default:
      return Protocol::kUnknown;
  }
}

const char* ProtocolName(Protocol p) {
  switch (p) {
    case Protocol::kNeedMore:
      return "need-more";
    case Protocol::kPlain:
      return "plain";
    case Protocol::kTls:
      return "tls";
    case Protocol::kSsh:
      return "ssh";
    case Protocol::kUnknown:
      return "unknown";
  }
  return "?";
}

Preamble ParsePreamble(std::string_view data) {
  Preamble p;
  auto bad = [&p](const char* why) {
    p.state = Preamble::State::kBad;
    p.error = why;
    p.job_id.clear();
    p.secret.clear();
    return p;
  };
  // Magic, possibly still arriving.
  size_t m = std::min(data.size(), kPreambleMagic.size());
  if (data.substr(0, m) != kPreambleMagic.substr(0, m)) return bad("not a BROKER1 preamble");
  if (data.size() <= kPreambleMagic.size()) return p;

  size_t i = kPreambleMagic.size();
  size_t limit = std::min(data.size(), kMaxPreambleBytes);
  // Job id up to the single space.
  size_t id_start = i;
  while (i < limit && data[i] != ' ') {
    if (!IsJobIdChar(data[i])) return bad("bad character in job id");
    if (i - id_start >= kMaxJobIdChars) return bad("job id too long");
    ++i;
  }
  if (i == limit) {
    return limit == kMaxPreambleBytes ? bad("preamble too long") : p;
  }
  if (i == id_start) return bad("empty job id");
  p.job_id.assign(data.substr(id_start, i - id_start));
  ++i;  // the space
  // Secret up to the newline.
  size_t secret_start = i;
  while (i < limit && IsHexChar(data[i])) ++i;
  if (i == limit) {
    p.job_id.clear();
    return limit == kMaxPreambleBytes ? bad("preamble too long") : p;
  }
  size_t secret_end = i;
  if (data[i] == '\r') {
    ++i;
    if (i == limit) {
      p.job_id.clear();
      return limit == kMaxPreambleBytes ? bad("preamble too long") : p;
    }
  }
  if (data[i] != '\n') return bad("bad character in secret");
  if (secret_end == secret_start) return bad("empty secret");
  p.secret.assign(data.substr(secret_start, secret_end - secret_start));
  p.length = i + 1;
  p.state = Preamble::State::kDone;
  return p;
}

std::string_view ErrorReply(ErrorCode code) {
  switch (code) {
    case ErrorCode::kDenied:
      return "ERR denied\n";
    case ErrorCode::kUnavailable:
      return "ERR unavailable\n";
    case ErrorCode::kBusy:
      return "ERR busy\n";
    case ErrorCode::kTimeout:
      return "ERR timeout\n";
    case ErrorCode::kBadRequest:
      return "ERR bad-request\n";
  }
  return "ERR bad-request\n";
}

const char* ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kDenied:
      return "denied";
    case ErrorCode::kUnavailable:
      return "unavailable";
    case ErrorCode::kBusy:
      return "busy";
    case ErrorCode::kTimeout:
      return "timeout";
    case ErrorCode::kBadRequest:
      return "bad-request";
  }
  return "bad-request";
}

}  // namespace brokerproxy::proxy
