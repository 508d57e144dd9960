// Histogram: how many observations fell at or below each of a fixed list of bounds, with their
// count and sum, as a Prometheus histogram reports them. Observing is a short linear scan over
// a dozen bounds and two additions: cheap enough for every connection. Loop-thread only.

#ifndef BROKERPROXY_LOOP_HISTOGRAM_H_
#define BROKERPROXY_LOOP_HISTOGRAM_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace brokerproxy::loop {

class Histogram {
 public:
  static constexpr size_t kMaxBounds = 16;

  // `bounds`: ascending upper bounds (at most kMaxBounds); a last bucket, +Inf, is implied.
  explicit Histogram(std::span<const double> bounds);

  void Observe(double value);

  std::span<const double> bounds() const { return {bounds_.data(), size_}; }
  // Observations at or below bounds()[i] (cumulative, as exposed); the +Inf bucket is count().
  uint64_t CumulativeCount(size_t i) const;
  uint64_t count() const { return count_; }
  double sum() const { return sum_; }

 private:
  std::array<double, kMaxBounds> bounds_{};
  std::array<uint64_t, kMaxBounds> buckets_{};  // per bucket, not cumulative
  size_t size_ = 0;
  uint64_t count_ = 0;
  double sum_ = 0;
};

// Bounds in seconds for handshakes and calls that take from a fraction of a millisecond to
// seconds, and for sessions that last from a second to days.
inline constexpr double kLatencyBounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                            0.1,    0.25,  0.5,    1,     2.5,  5,     10};
inline constexpr double kDurationBounds[] = {1,    10,    60,    300,   900,
                                             3600, 14400, 43200, 86400, 604800};

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_HISTOGRAM_H_
