#include "loop/histogram.h"

#include <algorithm>

namespace brokerproxy::loop {

Histogram::Histogram(std::span<const double> bounds) : size_(std::min(bounds.size(), kMaxBounds)) {
  std::copy_n(bounds.begin(), size_, bounds_.begin());
}

void Histogram::Observe(double value) {
  size_t i = 0;
  while (i < size_ && value > bounds_[i]) ++i;
  if (i < size_) ++buckets_[i];
  ++count_;
  sum_ += value;
}

uint64_t Histogram::CumulativeCount(size_t i) const {
  uint64_t n = 0;
  for (size_t k = 0; k <= i && k < size_; ++k) n += buckets_[k];
  return n;
}

}  // namespace brokerproxy::loop
