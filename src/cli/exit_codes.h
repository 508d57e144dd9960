// Exit codes of the brokerproxy command: one per failure a user or a script can act on.

#ifndef BROKERPROXY_CLI_EXIT_CODES_H_
#define BROKERPROXY_CLI_EXIT_CODES_H_

#include "loop/status.h"

namespace brokerproxy::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitNoMatch = 1;           // verify: the secret does not match
inline constexpr int kExitUsage = 2;             // bad flags, arguments or configuration
inline constexpr int kExitNotRunning = 3;        // the daemon (or login node) cannot be reached
inline constexpr int kExitPermissionDenied = 4;  // the job belongs to someone else
inline constexpr int kExitNotFound = 5;          // no such job
inline constexpr int kExitExhausted = 6;         // port range (or another pool) exhausted
inline constexpr int kExitTimeout = 7;           // a deadline passed (e.g. save --wait)
inline constexpr int kExitAlreadyExists = 8;     // e.g. a daemon already runs on the socket
inline constexpr int kExitStoreUnavailable = 9;  // the shared registry store is unreachable
inline constexpr int kExitFailure = 10;          // anything else (I/O, corruption, internal)

inline int ExitCodeFor(const Status& s) {
  switch (s.code()) {
    case Status::Code::kOk:
      return kExitOk;
    case Status::Code::kInvalidArgument:
      return kExitUsage;
    case Status::Code::kUnavailable:
      return kExitNotRunning;
    case Status::Code::kPermissionDenied:
      return kExitPermissionDenied;
    case Status::Code::kNotFound:
      return kExitNotFound;
    case Status::Code::kResourceExhausted:
      return kExitExhausted;
    case Status::Code::kTimeout:
      return kExitTimeout;
    case Status::Code::kAlreadyExists:
      return kExitAlreadyExists;
    case Status::Code::kStoreUnavailable:
      return kExitStoreUnavailable;
    case Status::Code::kIOError:
    case Status::Code::kCorruption:
    case Status::Code::kInternal:
      return kExitFailure;
  }
  return kExitFailure;
}

}  // namespace brokerproxy::cli

#endif  // BROKERPROXY_CLI_EXIT_CODES_H_
