#include "registry/job.h"

#include <string>

#include "registry/secret.h"

namespace brokerproxy::registry {
namespace {

// Longer paths would not open anyway (PATH_MAX on Linux).
constexpr size_t kMaxPathLength = 4096;

bool IsAlnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

// A certificate or key path as the daemon will open it: absolute (the daemon's working directory
// means nothing to the user) and free of control characters, which could forge log lines.
bool ValidPath(std::string_view path) {
  if (path.empty() || path.size() > kMaxPathLength || path.front() != '/') {
    return false;
  }
  for (char c : path) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return false;
    }
  }
  return true;
}

bool ValidTime(int64_t t) { return t >= 0 && t <= kMaxJobTime; }

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// The end of the digit run starting at `at` in `s`.
size_t DigitRunEnd(std::string_view s, size_t at) {
  while (at < s.size() && IsDigit(s[at])) ++at;
  return at;
}

}  // namespace

const char* JobTypeName(JobType type) {
  switch (type) {
    case JobType::kSsh:
      return "ssh";
    case JobType::kSsl:
      return "ssl";
  }
  return "unknown";
}

std::optional<JobType> ParseJobType(std::string_view name) {
  if (name == "ssh") {
    return JobType::kSsh;
  }
  if (name == "ssl") {
    return JobType::kSsl;
  }
  return std::nullopt;
}

const char* JobStateName(JobState state) {
  switch (state) {
    case JobState::kReady:
      return "ready";
    case JobState::kWaiting:
      return "waiting";
    case JobState::kDown:
      return "down";
  }
  return "unknown";
}

std::optional<JobState> ParseJobState(std::string_view name) {
  for (JobState s : {JobState::kReady, JobState::kWaiting, JobState::kDown}) {
    if (name == JobStateName(s)) {
      return s;
    }
  }
  return std::nullopt;
}

int NaturalCompare(std::string_view a, std::string_view b) {
  // The first difference in leading zeros between equal numbers, used only if nothing else
  // differs.
  int zeros_tie = 0;
  size_t i = 0;
  size_t j = 0;
  while (i < a.size() && j < b.size()) {
    if (!IsDigit(a[i]) || !IsDigit(b[j])) {
      // A digit against anything else, or two other bytes: byte order (unsigned, as memcmp).
      const auto ca = static_cast<unsigned char>(a[i]);
      const auto cb = static_cast<unsigned char>(b[j]);
      if (ca != cb) {
        return ca < cb ? -1 : 1;
      }
      ++i;
      ++j;
      continue;
    }
    const size_t a_end = DigitRunEnd(a, i);
    const size_t b_end = DigitRunEnd(b, j);
    size_t a_start = i;
    size_t b_start = j;
    while (a_start + 1 < a_end && a[a_start] == '0') ++a_start;
    while (b_start + 1 < b_end && b[b_start] == '0') ++b_start;
    // Without leading zeros, the longer run is the larger number; equal lengths compare
    // digit by digit, which is numeric order.
    const size_t a_len = a_end - a_start;
    const size_t b_len = b_end - b_start;
    if (a_len != b_len) {
      return a_len < b_len ? -1 : 1;
    }
    if (int c = a.substr(a_start, a_len).compare(b.substr(b_start, b_len)); c != 0) {
      return c < 0 ? -1 : 1;
    }
    if (zeros_tie == 0 && (a_end - i) != (b_end - j)) {
      zeros_tie = (a_end - i) < (b_end - j) ? -1 : 1;
    }
    i = a_end;
    j = b_end;
  }
  if (i < a.size() || j < b.size()) {
    return i < a.size() ? 1 : -1;  // a prefix first
  }
  return zeros_tie;
}

bool ValidJobId(std::string_view id) {
  if (id.empty() || id.size() > 64 || id == "." || id == "..") {
    return false;
  }
  for (char c : id) {
    if (!IsAlnum(c) && c != '.' && c != '_' && c != '-' && c != '+') {
      return false;
    }
  }
  return true;
}

bool DnsSafeJobId(std::string_view id) {
  for (char c : id) {
    if (c == '+') return false;
  }
  return ValidJobId(id);
}

std::string CanonicalJobId(std::string_view id) {
  std::string out(id);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') {
      c = static_cast<char>(c - 'A' + 'a');
    }
  }
  return out;
}

bool ValidHost(std::string_view host) {
  // A leading '-' would turn the host into an option of whatever command it is passed to.
  if (host.empty() || host.size() > 253 || host.front() == '-') {
    return false;
  }
  for (char c : host) {
    if (!IsAlnum(c) && c != '.' && c != ':' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

Status CheckJob(const Job& job) {
  if (!ValidJobId(job.id)) {
    return Status::InvalidArgument("field 'id' must be 1..64 characters of [A-Za-z0-9._+-]");
  }
  if (job.type != JobType::kSsh && job.type != JobType::kSsl) {
    return Status::InvalidArgument("field 'type' must be \"ssh\" or \"ssl\"");
  }
  if (!ValidHost(job.host)) {
    return Status::InvalidArgument(
        "field 'host' must be a host name or address of 1..253 characters of [A-Za-z0-9.:_-]");
  }
  if (job.port < 1 || job.port > 65535) {
    return Status::InvalidArgument("field 'port' must be in 1..65535");
  }
  if (!ValidSecretFormat(job.secret)) {
    return Status::InvalidArgument(
        "field 'secret' must be lower-case hex of " + std::to_string(kMinSecretBits / 4) + ".." +
        std::to_string(kMaxSecretBits / 4) + " characters, of even length");
  }
  if (!ValidTime(job.created)) {
    return Status::InvalidArgument("field 'created' must be in 0.." + std::to_string(kMaxJobTime));
  }
  if (!ValidTime(job.expires)) {
    return Status::InvalidArgument("field 'expires' must be in 0.." + std::to_string(kMaxJobTime));
  }
  if (job.type == JobType::kSsh) {
    if (!job.cert_path.empty() || !job.key_path.empty()) {
      return Status::InvalidArgument("fields 'cert_path' and 'key_path' are only for ssl jobs");
    }
  } else if (job.cert_path.empty() != job.key_path.empty()) {
    return Status::InvalidArgument("fields 'cert_path' and 'key_path' must be given together");
  } else if (!job.cert_path.empty()) {
    if (!ValidPath(job.cert_path)) {
      return Status::InvalidArgument(
          "field 'cert_path' must be an absolute path without control characters");
    }
    if (!ValidPath(job.key_path)) {
      return Status::InvalidArgument(
          "field 'key_path' must be an absolute path without control characters");
    }
  }
  return Status::OK();
}

}  // namespace brokerproxy::registry
