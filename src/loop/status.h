// Status and Result<T>: the error currency of brokerproxy.
//
// A Status is either OK or a (code, message) pair. OK is a null pointer, so the common case costs
// nothing to create, copy or return. Result<T> carries a value or a non-OK Status. Neither throws;
// code on the data plane never uses exceptions.
//
// Thread safety: distinct objects may be used from different threads; one object must not be
// mutated concurrently.

#ifndef BROKERPROXY_LOOP_STATUS_H_
#define BROKERPROXY_LOOP_STATUS_H_

#include <cassert>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace brokerproxy {

class Status {
 public:
  // The codes double as the wire codes of the control API and as the basis of the CLI's exit
  // codes, so their meaning is part of the interface: add new ones at the end.
  enum class Code : unsigned char {
    kOk = 0,
    kNotFound,           // no such job, file or entry
    kInvalidArgument,    // the caller sent something malformed or out of range
    kIOError,            // the OS refused a read, write, connect, ...
    kCorruption,         // stored data does not decode
    kPermissionDenied,   // the caller may not do this
    kUnavailable,        // a peer (daemon, backend) is not there right now
    kResourceExhausted,  // a bounded pool (ports, connections) is empty
    kTimeout,            // a deadline passed
    kAlreadyExists,      // the name is taken by someone else
    kStoreUnavailable,   // the shared registry store (Redis) cannot take a change now
    kInternal,           // a bug or an impossible state
  };

  Status() noexcept = default;
  Status(const Status& other) : state_(other.state_ ? new State(*other.state_) : nullptr) {}
  Status& operator=(const Status& other) {
    if (this != &other) state_.reset(other.state_ ? new State(*other.state_) : nullptr);
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status OK() { return Status(); }
  static Status NotFound(std::string_view msg) { return Status(Code::kNotFound, msg); }
  static Status InvalidArgument(std::string_view msg) {
    return Status(Code::kInvalidArgument, msg);
  }
  static Status IOError(std::string_view msg) { return Status(Code::kIOError, msg); }
  static Status Corruption(std::string_view msg) { return Status(Code::kCorruption, msg); }
  static Status PermissionDenied(std::string_view msg) {
    return Status(Code::kPermissionDenied, msg);
  }
  static Status Unavailable(std::string_view msg) { return Status(Code::kUnavailable, msg); }
  static Status ResourceExhausted(std::string_view msg) {
    return Status(Code::kResourceExhausted, msg);
  }
  static Status Timeout(std::string_view msg) { return Status(Code::kTimeout, msg); }
  static Status AlreadyExists(std::string_view msg) { return Status(Code::kAlreadyExists, msg); }
  static Status StoreUnavailable(std::string_view msg) {
    return Status(Code::kStoreUnavailable, msg);
  }
  static Status Internal(std::string_view msg) { return Status(Code::kInternal, msg); }
  // Builds a status from a code received over the wire or computed elsewhere.
  static Status FromCode(Code code, std::string_view msg) {
    return code == Code::kOk ? Status() : Status(code, msg);
  }

  bool ok() const { return state_ == nullptr; }
  Code code() const { return state_ ? state_->code : Code::kOk; }
  // The message alone, without the code name ("" when OK).
  const std::string& message() const;
  // "OK", or "<code name>: <message>".
  std::string ToString() const;

  // Returns a copy whose message is "<context>: <message>"; OK stays OK.
  Status WithContext(std::string_view context) const;

  // Stable lower_snake names used on the wire ("not_found", ...) and their inverse.
  static const char* CodeName(Code code);
  static std::optional<Code> CodeFromName(std::string_view name);

 private:
  struct State {
    Code code;
    std::string message;
  };
  Status(Code code, std::string_view msg) : state_(new State{code, std::string(msg)}) {}

  std::unique_ptr<State> state_;
};

// Status from an errno value at the OS boundary: ENOENT -> NotFound, EACCES/EPERM ->
// PermissionDenied, ECONNREFUSED/ENOENT on sockets -> see callers, everything else -> IOError.
Status PosixError(std::string_view context, int err);

// A value or an error. REQUIRES: a Result built from a Status holds a non-OK one.
template <typename T>
class Result {
 public:
  Result(T value) : value_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    assert(!status_.ok());
    if (status_.ok()) status_ = Status::Internal("Result built from an OK status");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & {
    assert(ok());
    return *value_;
  }
  const T& value() const& {
    assert(ok());
    return *value_;
  }
  T&& value() && {
    assert(ok());
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace brokerproxy

// Returns early from the enclosing function when `expr` yields a non-OK Status.
#define BP_RETURN_IF_ERROR(expr)               \
  do {                                         \
    ::brokerproxy::Status bp_status_ = (expr); \
    if (!bp_status_.ok()) return bp_status_;   \
  } while (0)

#endif  // BROKERPROXY_LOOP_STATUS_H_
