// Throttle: counts failed handshakes per key and refuses a key that fails too often.
//
// The proxy keys failures both by job id ("job:<id>") and by source address ("addr:<ip>"):
// everything that arrives through `ssh -L` comes from the login node itself, so the address
// alone cannot tell users apart, while the job id limits guessing at one job from anywhere.
// A key with `max_failures` failures within one `window` is refused for the next `window`;
// each such episode is reported once, so the log gets one line per episode (fail2ban reads it).
//
// Memory is bounded: at most `max_keys` keys are tracked; past that, stale keys are dropped and
// new keys are not tracked until room frees up (failing open rather than growing without end).
// Loop-thread only.

#ifndef BROKERPROXY_PROXY_THROTTLE_H_
#define BROKERPROXY_PROXY_THROTTLE_H_

#include <cstdint>
#include <string>
#include <unordered_map>

namespace brokerproxy::proxy {

class Throttle {
 public:
  Throttle(int max_failures, uint64_t window_ms, size_t max_keys = 100000)
      : max_failures_(max_failures), window_ms_(window_ms), max_keys_(max_keys) {}

  // True while `key` is refused.
  bool Blocked(const std::string& key, uint64_t now_ms) const;
  // Counts a failure; true if this one starts a refused episode (log it).
  bool RecordFailure(const std::string& key, uint64_t now_ms);
  // Forgets keys whose window and refusal are over.
  void Sweep(uint64_t now_ms);

  size_t size() const { return entries_.size(); }
  bool enabled() const { return max_failures_ > 0 && window_ms_ > 0; }

 private:
  struct Entry {
    uint64_t window_start = 0;
    int failures = 0;
    uint64_t blocked_until = 0;
  };
  int max_failures_;
  uint64_t window_ms_;
  size_t max_keys_;
  std::unordered_map<std::string, Entry> entries_;
};

}  // namespace brokerproxy::proxy

#endif  // BROKERPROXY_PROXY_THROTTLE_H_
