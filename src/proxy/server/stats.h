// Stats: the proxy's counters, for `brokerproxy stats` and the per-session log line.
//
// Global counters count every outcome; per-job counters exist for jobs that had sessions and
// are dropped once the job is gone and has no session left. Loop-thread only.

#ifndef BROKERPROXY_PROXY_SERVER_STATS_H_
#define BROKERPROXY_PROXY_SERVER_STATS_H_

#include <sys/types.h>

#include <cJSON.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>

namespace brokerproxy::proxy {

struct JobCounters {
  uint64_t connections = 0;  // sessions that reached the backend
  uint64_t active = 0;       // of those, open now
  uint64_t denied = 0;       // handshakes refused for this job id (wrong secret, throttled)
  uint64_t bytes_up = 0;     // client -> backend
  uint64_t bytes_down = 0;   // backend -> client
};

struct GlobalCounters {
  uint64_t accepted = 0;      // TCP connections accepted on the proxy port
  uint64_t active = 0;        // connections open now, in any state
  uint64_t spliced = 0;       // sessions that reached a backend
  uint64_t denied = 0;        // unknown job or wrong secret
  uint64_t bad_request = 0;   // unknown protocol, malformed preamble
  uint64_t timeouts = 0;      // handshake (or backend connect) too slow
  uint64_t unavailable = 0;   // the backend refused or could not be reached
  uint64_t busy = 0;          // turned away at max_connections
  uint64_t throttled = 0;     // refused because of repeated failures
  uint64_t idle_closed = 0;   // closed by idle_timeout or half_close_timeout
  uint64_t tls_failures = 0;  // TLS handshakes that failed
  uint64_t ssh_failures = 0;  // SSH key exchanges or authentications that failed
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

class Stats {
 public:
  GlobalCounters& global() { return global_; }
  const GlobalCounters& global() const { return global_; }
  JobCounters& job(const std::string& id) { return jobs_[id]; }

  // Drops counters of jobs for which `exists` is false and that have no active session.
  void Prune(const std::function<bool(const std::string&)>& exists);

  // {"connections":{...global...},"jobs":{"<id>":{...}}}; only jobs `visible` says yes to.
  void AddToJson(cJSON* out, const std::function<bool(const std::string&)>& visible) const;

 private:
  GlobalCounters global_;
  std::unordered_map<std::string, JobCounters> jobs_;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_SERVER_STATS_H_
