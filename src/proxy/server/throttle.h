// Throttle: counts failed handshakes per key and marks a key that fails too often.
//
// The proxy keys failures by job id ("job:<id>") and by source ("addr:<ip>" for remote
// addresses, "uid:<uid>" for loopback clients, whose owner the kernel names; see
// Proxy::SourceKey). A key with `max_failures` failures within one `window` is throttled for the
// next `window`; each such episode is reported once, so the log gets one line per episode
// (fail2ban reads it). Throttling only changes how failures are answered: the proxy checks the
// secret first and always admits a correct one, so a throttled job or source never locks out
// whoever knows the secret.
//
// Memory is bounded: at most `max_keys` keys of at most kMaxKeyBytes each are tracked; past
// that, stale keys are dropped and new keys are not tracked until room frees up (failing open
// rather than growing without end); a longer key is never tracked. Loop-thread only.

#ifndef BROKERPROXY_PROXY_SERVER_THROTTLE_H_
#define BROKERPROXY_PROXY_SERVER_THROTTLE_H_

#include <cstdint>
#include <string>
#include <unordered_map>

namespace brokerproxy::proxy {

class Throttle {
 public:
  static constexpr size_t kMaxKeyBytes = 128;

  Throttle(int max_failures, uint64_t window_ms, size_t max_keys = 100000)
      : max_failures_(max_failures), window_ms_(window_ms), max_keys_(max_keys) {}

  // True while `key` is throttled.
  bool Blocked(const std::string& key, uint64_t now_ms) const;
  // Counts a failure; true if this one starts a throttled episode (log it). A key longer than
  // kMaxKeyBytes is not counted.
  bool RecordFailure(const std::string& key, uint64_t now_ms);
  // Forgets keys whose window and refusal are over.
  void Sweep(uint64_t now_ms);

  size_t size() const { return entries_.size(); }
  bool enabled() const { return max_failures_ > 0 && window_ms_ > 0; }
  // New limits, for the failures counted from now on (the ones counted so far stay).
  void set_limits(int max_failures, uint64_t window_ms) {
    max_failures_ = max_failures;
    window_ms_ = window_ms;
  }

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

#endif  // BROKERPROXY_PROXY_SERVER_THROTTLE_H_
