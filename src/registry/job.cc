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
