#include "proxy/throttle.h"

#include <gtest/gtest.h>

namespace brokerproxy::proxy {
namespace {

TEST(ThrottleTest, BlocksAfterMaxFailuresWithinTheWindowThenForgives) {
  Throttle t(3, 1000);
  EXPECT_FALSE(t.RecordFailure("k", 0));
  EXPECT_FALSE(t.RecordFailure("k", 10));
  EXPECT_FALSE(t.Blocked("k", 20));
  EXPECT_TRUE(t.RecordFailure("k", 20));  // the episode starts: log once
  EXPECT_TRUE(t.Blocked("k", 21));
  EXPECT_TRUE(t.Blocked("k", 1019));
  EXPECT_FALSE(t.Blocked("k", 1020));
  EXPECT_FALSE(t.Blocked("other", 21)) << "keys are independent";
}

TEST(ThrottleTest, FailuresSpreadOverWindowsDoNotAddUp) {
  Throttle t(3, 1000);
  t.RecordFailure("k", 0);
  t.RecordFailure("k", 500);
  EXPECT_FALSE(t.RecordFailure("k", 1500));  // a new window began at 1500
  EXPECT_FALSE(t.Blocked("k", 1600));
}

TEST(ThrottleTest, OneLogLinePerEpisode) {
  Throttle t(2, 1000);
  t.RecordFailure("k", 0);
  EXPECT_TRUE(t.RecordFailure("k", 1));
  EXPECT_FALSE(t.RecordFailure("k", 2)) << "still the same episode";
}

TEST(ThrottleTest, MemoryIsBounded) {
  Throttle t(2, 1000, /*max_keys=*/100);
  for (int i = 0; i < 1000; ++i) t.RecordFailure("k" + std::to_string(i), 0);
  EXPECT_LE(t.size(), 100u);
  t.Sweep(5000);
  EXPECT_EQ(t.size(), 0u);
}

TEST(ThrottleTest, DisabledWithZero) {
  Throttle t(0, 1000);
  for (int i = 0; i < 10; ++i) EXPECT_FALSE(t.RecordFailure("k", i));
  EXPECT_FALSE(t.Blocked("k", 10));
}

}  // namespace
}  // namespace brokerproxy::proxy
