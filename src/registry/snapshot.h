// The registry on disk: `state_dir/registry.json`.
//
// Format (readable by an administrator, one job per array element):
//
//   {"format": 1, "checksum": "<sha256 hex>", "jobs": [ {...}, ... ]}
//
// `checksum` is the SHA-256 of the "jobs" array printed compactly by cJSON, so any flipped
// byte that still parses as JSON (a digit of a port, a letter of a secret) is detected. One
// decoder serves start-up and tests; it returns Corruption naming what is wrong, and the
// daemon refuses to start on it rather than discard jobs.
//
// The file is written with loop::WriteFileAtomic (loop/file.h: a fresh temp file, fsync, rename,
// fsync the directory), mode 0600. These functions block: the daemon calls them on the thread
// pool (registry/store.h), never on the loop thread.

#ifndef BROKERPROXY_REGISTRY_SNAPSHOT_H_
#define BROKERPROXY_REGISTRY_SNAPSHOT_H_

#include <sys/types.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loop/status.h"
#include "registry/job.h"

namespace brokerproxy::registry {

inline constexpr int kSnapshotFormat = 1;
// Refuse to read more than this (a registry of 100,000 jobs is about 40 MB).
inline constexpr size_t kMaxSnapshotBytes = 256u << 20;

// Deterministic: the same jobs in the same order give the same bytes.
std::string EncodeSnapshot(const std::vector<const Job*>& jobs);

// Every field of every job is checked (types, ranges, ValidJobId, ValidHost, secret format,
// duplicate ids); the first problem found is reported as Corruption("job 3 (id \"x\"): ...").
Result<std::vector<Job>> DecodeSnapshot(std::string_view data);

// Reads a whole file of at most `max_bytes`. nullopt if it does not exist; an error if it
// cannot be read or is larger.
Result<std::optional<std::string>> ReadFileIfExists(const std::string& path, size_t max_bytes);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_SNAPSHOT_H_
