#include "loop/log.h"

#include <gtest/gtest.h>

#include <string>

namespace brokerproxy {
namespace {

TEST(LogSafeTest, KeepsPlainTextAndEscapesEverythingThatCouldForgeALine) {
  EXPECT_EQ(LogSafe("job-7_a.b:c"), "job-7_a.b:c");
  EXPECT_EQ(LogSafe("x\nthrottling 1.2.3.4: 10"), "x\\x0athrottling\\x201.2.3.4:\\x2010");
  EXPECT_EQ(LogSafe(std::string("a\0b", 3)), "a\\x00b");
  EXPECT_EQ(LogSafe("back\\slash\r\t\x7f\xff"), "back\\x5cslash\\x0d\\x09\\x7f\\xff");
  EXPECT_EQ(LogSafe(""), "");
}

TEST(LogSafeTest, IsBounded) {
  std::string huge(250 * 1000, 'a');
  EXPECT_EQ(LogSafe(huge, 8), "aaaaaaaa...");
  EXPECT_EQ(LogSafe(huge).size(), 64u + 3u);
  EXPECT_EQ(LogSafe(std::string(64, 'b')), std::string(64, 'b'));
}

}  // namespace
}  // namespace brokerproxy
