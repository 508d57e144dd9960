#include "proxy/server/throttle.h"

namespace brokerproxy::proxy {

bool Throttle::Blocked(const std::string& key, uint64_t now_ms) const {
  if (!enabled()) return false;
  auto it = entries_.find(key);
  return it != entries_.end() && now_ms < it->second.blocked_until;
}

bool Throttle::RecordFailure(const std::string& key, uint64_t now_ms) {
  if (!enabled() || key.size() > kMaxKeyBytes) return false;
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    if (entries_.size() >= max_keys_) {
      Sweep(now_ms);
      if (entries_.size() >= max_keys_) return false;
    }
    it = entries_.emplace(key, Entry{now_ms, 0, 0}).first;
  }
  Entry& e = it->second;
  if (now_ms >= e.window_start + window_ms_) {
    e.window_start = now_ms;
    e.failures = 0;
  }
  if (++e.failures < max_failures_ || now_ms < e.blocked_until) return false;
  e.blocked_until = now_ms + window_ms_;
  return true;
}

void Throttle::Sweep(uint64_t now_ms) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    const Entry& e = it->second;
    if (now_ms >= e.window_start + window_ms_ && now_ms >= e.blocked_until) {
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace brokerproxy::proxy
