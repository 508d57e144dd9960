#include "proxy/server/sniffer.h"

namespace brokerproxy::proxy {
namespace {

bool IsJobIdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

bool IsHexChar(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

constexpr size_t kMaxJobIdChars = 64;

// Request methods of RFC 9110 (and PATCH), each with the space after it.
constexpr std::string_view kHttpMethods[] = {"GET ",     "HEAD ",    "POST ",  "PUT ",  "DELETE ",
                                             "OPTIONS ", "CONNECT ", "TRACE ", "PATCH "};

// kHttp, kNeedMore while `b` may still become a method, else kUnknown.
Protocol SniffHttp(std::string_view b) {
  bool prefix = false;
  for (std::string_view m : kHttpMethods) {
    if (b.substr(0, m.size()) == m) return Protocol::kHttp;
    if (b.size() < m.size() && m.substr(0, b.size()) == b) prefix = true;
  }
  return prefix ? Protocol::kNeedMore : Protocol::kUnknown;
}

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
      return SniffHttp(b);
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
    case Protocol::kHttp:
      return "http";
    case Protocol::kUnknown:
      return "unknown";
  }
  return "?";
}

void PreambleReader::Bad(const char* why) {
  result_.state = Preamble::State::kBad;
  result_.error = why;
  job_id_.clear();
  secret_.clear();
}

Preamble::State PreambleReader::Feed(std::string_view bytes) {
  if (result_.state != Preamble::State::kNeedMore) return result_.state;
  // Nothing at or past kMaxPreambleBytes is looked at: the verdict does not depend on how the
  // stream was split.
  std::string_view in = bytes.substr(0, kMaxPreambleBytes - pos_);
  for (size_t i = 0; i < in.size() && result_.state == Preamble::State::kNeedMore; ++i, ++pos_) {
    char c = in[i];
    switch (part_) {
      case Part::kMagic:
        if (c != kPreambleMagic[pos_]) {
          Bad("not a BROKER1 preamble");
        } else if (pos_ + 1 == kPreambleMagic.size()) {
          part_ = Part::kJobId;
        }
        break;
      case Part::kJobId:
        // Job id up to the single space.
        if (c == ' ') {
          if (job_id_.empty()) {
            Bad("empty job id");
          } else {
            part_ = Part::kSecret;
          }
        } else if (!IsJobIdChar(c)) {
          Bad("bad character in job id");
        } else if (job_id_.size() >= kMaxJobIdChars) {
          Bad("job id too long");
        } else {
          job_id_.push_back(c);
        }
        break;
      case Part::kSecret:
        // Secret up to the newline.
        if (IsHexChar(c)) {
          secret_.push_back(c);
          break;
        }
        if (c == '\r') {
          part_ = Part::kCarriageReturn;
          break;
        }
        [[fallthrough]];
      case Part::kCarriageReturn:
        if (c != '\n') {
          Bad("bad character in secret");
        } else if (secret_.empty()) {
          Bad("empty secret");
        } else {
          result_.state = Preamble::State::kDone;
          result_.job_id = std::move(job_id_);
          result_.secret = std::move(secret_);
          result_.length = pos_ + 1;
        }
        break;
    }
  }
  if (result_.state == Preamble::State::kNeedMore && pos_ == kMaxPreambleBytes) {
    Bad("preamble too long");
  }
  return result_.state;
}

Preamble ParsePreamble(std::string_view data) {
  PreambleReader reader;
  reader.Feed(data);
  return reader.Take();
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

std::string HttpBadRequest(std::string_view tls_domain, int port) {
  std::string p = std::to_string(port);
  std::string body =
      "This is the brokerproxy port, not a web server. Reach a job with `brokerproxy connect JOB "
      "--listen 8888` and open http://127.0.0.1:8888/, or, for an ssl job, open https://JOB." +
      std::string(tls_domain) + ":" + p + "/ (TLS with the server name JOB." +
      std::string(tls_domain) + ").\n";
  return "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
         "Content-Length: " +
         std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
}

}  // namespace brokerproxy::proxy
