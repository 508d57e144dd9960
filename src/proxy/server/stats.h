// Stats: the proxy's counters, for `brokerproxy stats`, `query`'s activity, the metrics and the
// per-session log line.
//
// Global counters count every outcome; per-job counters exist for jobs that had sessions and
// are dropped once the job is gone and has no session left. A session (a plain or TLS
// connection, or one SSH channel, that reached its backend) is counted by SessionStarted() and
// SessionEnded(), which also feed the handshake and duration histograms and the job's last
// activity. Loop-thread only.

#ifndef BROKERPROXY_PROXY_SERVER_STATS_H_
#define BROKERPROXY_PROXY_SERVER_STATS_H_

#include <sys/types.h>

#include <cJSON.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>

#include "loop/histogram.h"

namespace brokerproxy::proxy {

struct JobCounters {
  uint64_t connections = 0;  // sessions that reached the backend
  uint64_t active = 0;       // of those, open now
  uint64_t denied = 0;       // handshakes refused for this job id (wrong secret, throttled)
  uint64_t bytes_up = 0;     // client -> backend
  uint64_t bytes_down = 0;   // backend -> client
  int64_t last_active = 0;   // unix time of the last session start, end or bytes seen
};

struct GlobalCounters {
  uint64_t accepted = 0;            // TCP connections accepted on the proxy port
  uint64_t active = 0;              // connections open now, in any state
  uint64_t spliced = 0;             // sessions that reached a backend
  uint64_t denied = 0;              // unknown job or wrong secret
  uint64_t bad_request = 0;         // unknown protocol, malformed preamble
  uint64_t timeouts = 0;            // handshake (or backend connect) too slow
  uint64_t unavailable = 0;         // the backend refused or could not be reached
  uint64_t busy = 0;                // turned away at max_connections
  uint64_t throttled = 0;           // refused because of repeated failures
  uint64_t throttled_episodes = 0;  // sources or job ids that started being throttled
  uint64_t idle_closed = 0;         // closed by idle_timeout or half_close_timeout
  uint64_t tls_failures = 0;        // TLS handshakes that failed
  uint64_t ssh_failures = 0;        // SSH key exchanges or authentications that failed
  uint64_t bytes_up = 0;
  uint64_t bytes_down = 0;
};

class Stats;

// Adds one connection's byte totals to the counters as they grow, each byte once.
class ByteReport {
 public:
  // `up`/`down`: the connection's totals so far (client -> backend, backend -> client).
  // Returns the bytes added now, each way.
  std::pair<uint64_t, uint64_t> Flush(Stats* stats, const std::string& job, uint64_t up,
                                      uint64_t down);

 private:
  uint64_t up_ = 0;
  uint64_t down_ = 0;
};

// How a session reached its backend, for the handshake histogram's label.
enum class SessionKind { kPlain, kTls, kSsh };
inline constexpr size_t kSessionKinds = 3;
const char* SessionKindName(SessionKind kind);

class Stats {
 public:
  Stats();

  GlobalCounters& global() { return global_; }
  const GlobalCounters& global() const { return global_; }
  JobCounters& job(const std::string& id) { return jobs_[id]; }
  const std::unordered_map<std::string, JobCounters>& jobs() const { return jobs_; }

  // A session of `job` reached its backend `handshake_s` seconds after its client connected.
  void SessionStarted(const std::string& job, SessionKind kind, double handshake_s);
  // That session ended after `duration_s` seconds of relaying.
  void SessionEnded(const std::string& job, double duration_s);
  // Bytes moved for `job` (ByteReport): it is active now.
  void Touch(const std::string& job) { jobs_[job].last_active = Now(); }

  const loop::Histogram& handshake_seconds(SessionKind kind) const {
    return handshake_[static_cast<size_t>(kind)];
  }
  const loop::Histogram& session_seconds() const { return duration_; }

  // Drops counters of jobs for which `exists` is false and that have no active session.
  void Prune(const std::function<bool(const std::string&)>& exists);

  // {"connections":{...global...},"per_job":{"<id>":{...}}}; only jobs `visible` says yes to.
  void AddToJson(cJSON* out, const std::function<bool(const std::string&)>& visible) const;

 private:
  static int64_t Now();

  GlobalCounters global_;
  std::unordered_map<std::string, JobCounters> jobs_;
  std::array<loop::Histogram, kSessionKinds> handshake_;
  loop::Histogram duration_;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_STATS_H_
