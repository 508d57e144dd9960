// Job: one registered service, and the rules for its fields.
//
// A job is what `brokerproxy save` creates: a service of some `type` that its `owner` runs at
// backend `host`:`port`, reachable through the proxy by whoever knows its `secret`.

#ifndef BROKERPROXY_REGISTRY_JOB_H_
#define BROKERPROXY_REGISTRY_JOB_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "loop/status.h"

namespace brokerproxy::registry {

enum class JobType { kSsh, kSsl };

const char* JobTypeName(JobType type);  // "ssh" | "ssl"
std::optional<JobType> ParseJobType(std::string_view name);

struct Job {
  std::string id;  // ValidJobId(), canonical (CanonicalJobId) once in a Registry
  JobType type = JobType::kSsh;
  uid_t owner = 0;              // uid of the user who saved it
  std::string host;             // backend host name or address, ValidHost()
  int port = 0;                 // backend port, 1..65535
  bool port_allocated = false;  // true if the port came from [registry] port_range
  std::string secret;           // lower-case hex, 2 * secret_bits / 8 characters; never logged
  std::string cert_path;        // `ssl` jobs: the issued certificate (PEM), else empty
  std::string key_path;         // `ssl` jobs: its private key (PEM, 0600), else empty
  int64_t created = 0;          // unix seconds
  int64_t expires = 0;          // unix seconds; 0 = never
  // Seen listening since it was saved (persisted); false while the daemon waits for the backend
  // to listen. What clients are shown is the JobState the broker derives from it (broker.h).
  bool ready = true;

  bool operator==(const Job&) const = default;
};

// What a job's backend looked like to the daemon lately (broker.h says how each is decided):
// ready: seen listening; waiting: not seen listening yet, and probed; down: the probe gave up,
// or the backend refused a connection after it was ready and has not listened since.
enum class JobState { kReady, kWaiting, kDown };

const char* JobStateName(JobState state);  // "ready" | "waiting" | "down"
std::optional<JobState> ParseJobState(std::string_view name);

// Job times are unix seconds in 0..kMaxJobTime (the last second of year 9999). The bound keeps
// them exact in the snapshot: cJSON prints numbers with 15 significant digits.
inline constexpr int64_t kMaxJobTime = 253'402'300'799;

// Job ids: [A-Za-z0-9._+-]{1,64}, not "." or "..". '+' is for the components of Slurm's
// heterogeneous jobs ("12+1"); a DNS name cannot carry it (DnsSafeJobId).
bool ValidJobId(std::string_view id);
// A ValidJobId that can also be part of a DNS name (<id>.<tls_domain>: SNI, the certificate
// of an ssl job): no '+'.
bool DnsSafeJobId(std::string_view id);
// The one spelling of a job id: ASCII lower case. An id names a job case-insensitively,
// because it becomes a DNS name (<id>.<tls_domain>: SNI and certificates fold case), so "ABC"
// and "abc" must never be two jobs of two users. The registry stores and looks up this form;
// every parser may hand it any spelling.
std::string CanonicalJobId(std::string_view id);
// Natural order of ids, as jobs are listed: runs of digits compare as the numbers they spell
// ("7" < "9" < "11"), everything else byte by byte ("11" < "11.web" < "11_2" < "11a"), a string
// before every longer string it begins. Digit runs of any length compare exactly (no integer
// conversion). Equal numbers spelt with different leading zeros ("7" and "07") are ordered by
// the first such run, fewer zeros first, so only identical strings compare equal: a total order.
// Returns <0, 0 or >0.
int NaturalCompare(std::string_view a, std::string_view b);
inline bool NaturalLess(std::string_view a, std::string_view b) { return NaturalCompare(a, b) < 0; }

// Backend hosts: a DNS name or an IPv4/IPv6 literal, 1..253 characters of
// [A-Za-z0-9.:_-], not starting with '-'; no spaces, no brackets, nothing a shell, a command
// line or a log line could misread.
bool ValidHost(std::string_view host);

// OK if every field of `job` obeys the rules above: ValidJobId, a known type, ValidHost, port
// 1..65535, ValidSecretFormat, `created` and `expires` in 0..kMaxJobTime, and certificate paths
// only for `ssl` jobs (both empty, or both absolute paths without control characters). Else
// InvalidArgument naming the first bad field, never quoting the secret. Registry::Put and the
// snapshot decoder share this check.
Status CheckJob(const Job& job);

}  // namespace brokerproxy::registry

#endif  // BROKERPROXY_REGISTRY_JOB_H_
