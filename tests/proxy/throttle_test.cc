#include "proxy/server/throttle.h"

#include <gtest/gtest.h>

#include <string>

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

TEST(ThrottleTest, KeysAreBoundedInLength) {
  // A peer that picks the key (a user name, say) must not make each entry large: a key longer
  // than kMaxKeyBytes is never stored, so the table holds at most max_keys * kMaxKeyBytes.
  Throttle t(1, 1000, /*max_keys=*/10);
  std::string huge(256 * 1024, 'x');
  EXPECT_FALSE(t.RecordFailure(huge, 0));
  EXPECT_FALSE(t.Blocked(huge, 1));
  EXPECT_EQ(t.size(), 0u);
  std::string longest(Throttle::kMaxKeyBytes, 'y');
  EXPECT_TRUE(t.RecordFailure(longest, 0));
  EXPECT_TRUE(t.Blocked(longest, 1));
  for (int i = 0; i < 100; ++i) t.RecordFailure(longest + std::to_string(i), 0);
  EXPECT_LE(t.size(), 10u);
}

// The clock is the caller's (milliseconds of loop time), so windows and lock-outs are driven
// here with explicit times, without waiting for them.
TEST(ThrottleTest, ALockOutLastsOneWindowFromItsStartAndANewEpisodeMayFollow) {
  Throttle t(3, 1000);
  t.RecordFailure("k", 0);
  t.RecordFailure("k", 10);
  ASSERT_TRUE(t.RecordFailure("k", 20));
  // Failing on while locked out neither logs again nor makes the lock-out longer.
  for (uint64_t now = 100; now < 1000; now += 100) EXPECT_FALSE(t.RecordFailure("k", now));
  EXPECT_TRUE(t.Blocked("k", 1019));
  EXPECT_FALSE(t.Blocked("k", 1020));
  // A later burst is a new episode: logged once more, locked out one window from then.
  EXPECT_FALSE(t.RecordFailure("k", 1100));
  EXPECT_FALSE(t.RecordFailure("k", 1101));
  EXPECT_TRUE(t.RecordFailure("k", 1102));
  EXPECT_TRUE(t.Blocked("k", 2101));
  EXPECT_FALSE(t.Blocked("k", 2102));
}

TEST(ThrottleTest, SweepKeepsKeysThatAreCountingOrLockedOut) {
  Throttle t(2, 1000);
  t.RecordFailure("counting", 500);
  t.RecordFailure("blocked", 0);
  ASSERT_TRUE(t.RecordFailure("blocked", 900));  // locked out until 1900
  t.Sweep(1200);                                 // both windows are still open or locked
  EXPECT_EQ(t.size(), 2u);
  EXPECT_TRUE(t.Blocked("blocked", 1200));
  t.Sweep(1500);  // "counting"'s window is over
  EXPECT_EQ(t.size(), 1u);
  EXPECT_TRUE(t.Blocked("blocked", 1500)) << "a sweep must not end a lock-out";
  t.Sweep(1900);
  EXPECT_EQ(t.size(), 0u);
}

TEST(ThrottleTest, AFullTableMakesRoomFromStaleKeysOnly) {
  Throttle t(2, 1000, /*max_keys=*/2);
  t.RecordFailure("a", 0);
  t.RecordFailure("b", 0);
  // Both still counting: a third key is not tracked (fails open) ...
  t.RecordFailure("c", 10);
  EXPECT_FALSE(t.RecordFailure("c", 11));
  EXPECT_FALSE(t.Blocked("c", 12));
  EXPECT_EQ(t.size(), 2u);
  // ... until their window is over, when it takes their room.
  t.RecordFailure("c", 1000);
  EXPECT_TRUE(t.RecordFailure("c", 1001));
  EXPECT_TRUE(t.Blocked("c", 1002));
  EXPECT_EQ(t.size(), 1u);
}

TEST(ThrottleTest, DisabledWithZero) {
  Throttle t(0, 1000);
  for (int i = 0; i < 10; ++i) EXPECT_FALSE(t.RecordFailure("k", i));
  EXPECT_FALSE(t.Blocked("k", 10));
}

}  // namespace
}  // namespace brokerproxy::proxy
