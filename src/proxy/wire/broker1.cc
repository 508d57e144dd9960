#include "proxy/wire/broker1.h"

#include <algorithm>

namespace brokerproxy::proxy {

bool IsJobIdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

bool IsSecretChar(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

std::string EncodePreamble(std::string_view job_id, std::string_view secret) {
  std::string line;
  line.reserve(kPreambleMagic.size() + job_id.size() + 1 + secret.size() + 1);
  line.append(kPreambleMagic).append(job_id).append(" ").append(secret).append("\n");
  return line;
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
        if (IsSecretChar(c)) {
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

namespace {

constexpr ErrorCode kErrorCodes[] = {ErrorCode::kDenied, ErrorCode::kUnavailable, ErrorCode::kBusy,
                                     ErrorCode::kTimeout, ErrorCode::kBadRequest};
constexpr std::string_view kErrorPrefix = "ERR ";

}  // namespace

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
  // The word after "ERR " (ParseReply() matches against these).
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

std::string_view EncodeReply(std::optional<ErrorCode> error) {
  return error ? ErrorReply(*error) : kReplyOk;
}

Reply ParseReply(std::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  Reply r;
  r.line.assign(line.substr(0, kMaxReplyLine));
  if (line == kReplyOk.substr(0, kReplyOk.size() - 1)) {
    r.kind = Reply::Kind::kOk;
    return r;
  }
  if (line.substr(0, kErrorPrefix.size()) == kErrorPrefix) {
    std::string_view code = line.substr(kErrorPrefix.size());
    for (ErrorCode e : kErrorCodes) {
      if (code == ErrorCodeName(e)) {
        r.kind = Reply::Kind::kError;
        r.error = e;
        return r;
      }
    }
  }
  return r;
}

size_t ReplyReader::Feed(std::string_view bytes) {
  if (state_ != State::kNeedMore) return 0;
  size_t room = kMaxReplyLine - line_.size();
  size_t nl = bytes.substr(0, room).find('\n');
  size_t take = nl == std::string_view::npos ? std::min(bytes.size(), room) : nl + 1;
  line_.append(bytes.substr(0, take));
  if (nl != std::string_view::npos) {
    line_.pop_back();  // '\n'
    reply_ = ParseReply(line_);
    std::string().swap(line_);
    state_ = State::kDone;
  } else if (line_.size() >= kMaxReplyLine) {
    std::string().swap(line_);
    state_ = State::kBad;
  }
  return take;
}

Status ReplyStatus(const Reply& reply, std::string_view job_id) {
  std::string job(job_id);
  // What the proxy said, quoted in every message (bounded: it came off the network).
  const std::string said = reply.line.substr(0, 80);
  if (reply.kind == Reply::Kind::kOk) return Status::OK();
  if (reply.kind == Reply::Kind::kUnknown) {
    return Status::IOError("unexpected reply from the proxy: '" + said + "'");
  }
  switch (*reply.error) {
    case ErrorCode::kDenied:
      return Status::PermissionDenied("the proxy refused job " + job +
                                      ": unknown job or wrong secret (" + said + ")");
    case ErrorCode::kUnavailable:
      return Status::Unavailable("job " + job +
                                 " is registered but its service does not accept connections "
                                 "(not started yet, or stopped) (" +
                                 said + ")");
    case ErrorCode::kBusy:
      return Status::ResourceExhausted("the proxy is busy or throttling job " + job +
                                       "; try again shortly (" + said + ")");
    case ErrorCode::kTimeout:
      return Status::Timeout("the proxy timed out the handshake (" + said + ")");
    case ErrorCode::kBadRequest:
      return Status::InvalidArgument("the proxy did not understand the handshake (" + said + ")");
  }
  return Status::IOError("unexpected reply from the proxy: '" + said + "'");
}

bool WorthRefetchingSecret(const Reply& reply) {
  return reply.kind == Reply::Kind::kError &&
         (*reply.error == ErrorCode::kDenied || *reply.error == ErrorCode::kBusy);
}

}  // namespace brokerproxy::proxy
