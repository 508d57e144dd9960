// loop/histogram.h: which bucket an observation lands in, and the cumulative counts a
// Prometheus histogram exposes.

#include "loop/histogram.h"

#include <gtest/gtest.h>

namespace brokerproxy::loop {
namespace {

TEST(HistogramTest, AValueOnABoundCountsInThatBucketAndAboveAllInfOnly) {
  const double bounds[] = {1, 5, 10};
  Histogram h(bounds);
  for (double v : {0.5, 1.0, 1.5, 5.0, 11.0, 100.0}) h.Observe(v);
  EXPECT_EQ(h.CumulativeCount(0), 2u);  // 0.5, 1
  EXPECT_EQ(h.CumulativeCount(1), 4u);  // + 1.5, 5
  EXPECT_EQ(h.CumulativeCount(2), 4u);  // nothing in (5, 10]
  EXPECT_EQ(h.count(), 6u);             // +Inf
  EXPECT_DOUBLE_EQ(h.sum(), 119.0);
  ASSERT_EQ(h.bounds().size(), 3u);
  EXPECT_EQ(h.bounds()[2], 10);
}

TEST(HistogramTest, TheSharedBoundsAscendAndFit) {
  for (auto bounds :
       {std::span<const double>(kLatencyBounds), std::span<const double>(kDurationBounds)}) {
    ASSERT_LE(bounds.size(), Histogram::kMaxBounds);
    for (size_t i = 1; i < bounds.size(); ++i) EXPECT_LT(bounds[i - 1], bounds[i]);
    EXPECT_EQ(Histogram(bounds).bounds().size(), bounds.size());
  }
}

}  // namespace
}  // namespace brokerproxy::loop
