#include "loop/status.h"

#include <cerrno>
#include <cstring>

namespace brokerproxy {
namespace {

struct CodeEntry {
  Status::Code code;
  const char* name;
};

constexpr CodeEntry kCodeNames[] = {
    {Status::Code::kOk, "ok"},
    {Status::Code::kNotFound, "not_found"},
    {Status::Code::kInvalidArgument, "invalid_argument"},
    {Status::Code::kIOError, "io_error"},
    {Status::Code::kCorruption, "corruption"},
    {Status::Code::kPermissionDenied, "permission_denied"},
    {Status::Code::kUnavailable, "unavailable"},
    {Status::Code::kResourceExhausted, "resource_exhausted"},
    {Status::Code::kTimeout, "timeout"},
    {Status::Code::kAlreadyExists, "already_exists"},
    {Status::Code::kStoreUnavailable, "store_unavailable"},
    {Status::Code::kInternal, "internal"},
};

}  // namespace

const std::string& Status::message() const {
  static const std::string kEmpty;
  return state_ ? state_->message : kEmpty;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out = CodeName(state_->code);
  out += ": ";
  out += state_->message;
  return out;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return Status();
  std::string msg(context);
  msg += ": ";
  msg += state_->message;
  return Status(state_->code, msg);
}

const char* Status::CodeName(Code code) {
  for (const auto& e : kCodeNames) {
    if (e.code == code) return e.name;
  }
  return "unknown";
}

std::optional<Status::Code> Status::CodeFromName(std::string_view name) {
  for (const auto& e : kCodeNames) {
    if (name == e.name) return e.code;
  }
  return std::nullopt;
}

Status PosixError(std::string_view context, int err) {
  std::string msg(context);
  msg += ": ";
  msg += std::strerror(err);
  switch (err) {
    case ENOENT:
      return Status::NotFound(msg);
    case EACCES:
    case EPERM:
      return Status::PermissionDenied(msg);
    case ECONNREFUSED:
      return Status::Unavailable(msg);
    case ETIMEDOUT:
      return Status::Timeout(msg);
    case EEXIST:
      return Status::AlreadyExists(msg);
    case EMFILE:
    case ENFILE:
    case ENOSPC:
    case ENOMEM:
      return Status::ResourceExhausted(msg);
    default:
      return Status::IOError(msg);
  }
}

}  // namespace brokerproxy
