#include "loop/log.h"

#include <gtest/gtest.h>

#include <regex>

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

// Restores the default form after each test.
class LogFormatTest : public ::testing::Test {
 protected:
  void TearDown() override {
    SetLogFormat(LogFormat::kText);
    SetLogToJournal(false);
  }
};

TEST_F(LogFormatTest, TextHasATimestampUnlessTheJournalStampsIt) {
  std::string line = FormatLogLine(LogLevel::kWarn, "proxy: hello");
  EXPECT_TRUE(std::regex_match(
      line, std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z warn  proxy: hello)")))
      << line;
  SetLogToJournal(true);
  EXPECT_EQ(FormatLogLine(LogLevel::kWarn, "proxy: hello"), "<4>warn  proxy: hello");
  EXPECT_EQ(FormatLogLine(LogLevel::kError, "x"), "<3>error x");
  EXPECT_EQ(FormatLogLine(LogLevel::kInfo, "x"), "<6>info  x");
  EXPECT_EQ(FormatLogLine(LogLevel::kDebug, "x"), "<7>debug x");
}

TEST_F(LogFormatTest, JsonCarriesTheKeyValueWordsAsFields) {
  SetLogFormat(LogFormat::kJson);
  SetLogToJournal(true);  // no time field: the rest is exact
  EXPECT_EQ(FormatLogLine(LogLevel::kInfo,
                          "session 7 job=42 peer=127.0.0.1:5000 up=10 down=2 duration=0.100s "
                          "reason=client closed during handshake"),
            R"(<6>{"level":"info","message":"session 7 job=42 peer=127.0.0.1:5000 up=10 down=2 )"
            R"(duration=0.100s reason=client closed during handshake","job":42,)"
            R"("peer":"127.0.0.1:5000","up":10,"down":2,"duration":"0.100s",)"
            R"("reason":"client closed during handshake"})");
  // Quotes, backslashes and control bytes are escaped; a word cannot replace the object's own
  // fields or repeat a key.
  EXPECT_EQ(FormatLogLine(LogLevel::kWarn, "a\"b\\c\x01 level=x message=y job=1 job=2"),
            R"(<4>{"level":"warn","message":"a\"b\\c\u0001 level=x message=y job=1 job=2",)"
            R"("job":1})");
  SetLogToJournal(false);
  std::string line = FormatLogLine(LogLevel::kInfo, "x=1");
  EXPECT_TRUE(std::regex_match(
      line, std::regex(R"(\{"time":"\d{4}-[^"]+Z","level":"info","message":"x=1","x":1\})")))
      << line;
}

TEST_F(LogFormatTest, ParsesItsNames) {
  EXPECT_EQ(ParseLogFormat("text"), LogFormat::kText);
  EXPECT_EQ(ParseLogFormat("json"), LogFormat::kJson);
  EXPECT_FALSE(ParseLogFormat("JSON"));
}

}  // namespace
}  // namespace brokerproxy
