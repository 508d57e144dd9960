// The manual pages come from the program: every option of the table is in brokerproxy.ini(5),
// every command in brokerproxy(1), and any help text renders as written (roff escaping).

#include "cli/manpage.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

#include "cli/options.h"
#include "e2e/harness.h"

namespace brokerproxy::cli {
namespace {

TEST(ManPageTest, EscapesWhatRoffWouldReadAsMarkup) {
  EXPECT_EQ(RoffEscape("a\\b"), "a\\eb");
  EXPECT_EQ(RoffEscape("--listen"), "\\-\\-listen");
  // A period or apostrophe at the start of a line would be a request.
  EXPECT_EQ(RoffEscape(".so /etc/passwd"), "\\&.so /etc/passwd");
  EXPECT_EQ(RoffEscape("x\n'y"), "x\n\\&'y");
  EXPECT_EQ(RoffEscape("a.b 'c'"), "a.b 'c'");
}

TEST(ManPageTest, ConfigPageHasEveryOptionUnderItsSection) {
  std::string page = ManPageConfig("9.9");
  EXPECT_EQ(page.rfind(".TH BROKERPROXY.INI 5", 0), 0u);
  for (const OptionSpec& spec : OptionTable()) {
    std::string section = ".SH [" + std::string(spec.section) + "]";
    size_t at = page.find(section);
    ASSERT_NE(at, std::string::npos) << section;
    EXPECT_NE(page.find("\\fB" + RoffEscape(spec.key) + "\\fR", at), std::string::npos)
        << spec.section << "." << spec.key;
  }
}

TEST(ManPageTest, CommandsPageHasEveryCommandAndRendersWithoutWarnings) {
  auto r = testing::RunCommand({testing::BinaryPath(), "config", "--man", "1"});
  ASSERT_EQ(r.exit_code, 0) << r;
  for (const char* command : {"run", "save", "load", "verify", "query", "remove", "stats",
                              "connect", "epilog", "ca", "config"}) {
    EXPECT_NE(r.out.find(".SS \\fB" + std::string(command) + "\\fR"), std::string::npos) << command;
  }
  EXPECT_NE(r.out.find("\\fB\\-\\-stdio\\fR"), std::string::npos);
  EXPECT_EQ(r.out.find("\\-\\-help"), std::string::npos) << "help flags listed";
  auto five = testing::RunCommand({testing::BinaryPath(), "config", "--man", "5"});
  ASSERT_EQ(five.exit_code, 0) << five;
  auto version = testing::RunCommand({testing::BinaryPath(), "--version"});
  ASSERT_EQ(version.out.rfind("brokerproxy ", 0), 0u) << version;
  std::string v = version.out.substr(12, version.out.find_first_of(" \n", 12) - 12);
  EXPECT_EQ(five.out, ManPageConfig(v));
  EXPECT_EQ(testing::RunCommand({testing::BinaryPath(), "config", "--man", "3"}).exit_code, 2);
  if (::access("/usr/bin/groff", X_OK) != 0) GTEST_SKIP() << "groff is not installed";
  // -ww: every warning; -z: no output. A page with bad markup warns.
  for (const std::string* page : {&r.out, &five.out}) {
    testing::TempDir dir;
    testing::WriteFile(dir / "page", *page);
    auto g = testing::RunCommand({"sh", "-c", "groff -man -ww -z " + (dir / "page") + " 2>&1"});
    EXPECT_EQ(g.exit_code, 0) << g;
    EXPECT_EQ(g.out, "") << g.out;
  }
}

}  // namespace
}  // namespace brokerproxy::cli
