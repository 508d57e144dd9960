// The documents' facts against the code: the defaults and limits README.md and docs/*.md state
// must be those of the option table (src/cli/options.cc), and every section a source comment
// cites must exist.
//
// A stated default is marked where it stands, invisible once rendered:
//
//   `[ssh] banner_delay` (<!-- option: ssh.banner_delay -->300 ms<!-- /option -->)
//
// The text between the markers is read as that option's value the way config.ini would be (after
// dropping backticks and the spaces and thousands separators of prose: "300 ms", "1,024",
// "28000–28999"; "off" is 0; "<state_dir>" stands for the state directory) and must give the
// default. `option-max:` marks an option's upper bound instead.

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "cli/options.h"

namespace brokerproxy::cli {
namespace {

namespace fs = std::filesystem;

const fs::path kRoot = BROKERPROXY_SOURCE_DIR;
constexpr const char* kStateDir = "/state-dir-of-the-test";

std::string ReadText(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  EXPECT_TRUE(in.good() || in.eof()) << path;
  return s.str();
}

std::vector<fs::path> Documents() {
  std::vector<fs::path> docs{kRoot / "README.md"};
  for (const auto& entry : fs::directory_iterator(kRoot / "docs")) {
    if (entry.path().extension() == ".md") docs.push_back(entry.path());
  }
  return docs;
}

struct Fact {
  std::string where;  // file:line
  bool max = false;   // option-max: the upper bound
  std::string key;    // section.key
  std::string text;   // as written between the markers
};

std::vector<Fact> Facts() {
  static const std::regex kMarker(
      R"(<!-- option(-max)?: ([a-z_]+\.[a-z_]+) -->([\s\S]*?)<!-- /option -->)");
  std::vector<Fact> facts;
  for (const fs::path& doc : Documents()) {
    const std::string text = ReadText(doc);
    for (std::sregex_iterator it(text.begin(), text.end(), kMarker), end; it != end; ++it) {
      const auto& m = *it;
      const size_t line = 1 + std::count(text.begin(), text.begin() + m.position(0), '\n');
      facts.push_back(
          {doc.filename().string() + ":" + std::to_string(line), m[1].matched, m[2], m[3]});
    }
  }
  return facts;
}

const OptionSpec* FindSpec(const std::string& key) {
  for (const OptionSpec& spec : OptionTable()) {
    if (std::string(spec.section) + "." + spec.key == key) return &spec;
  }
  return nullptr;
}

// Prose to config.ini syntax.
std::string Normalize(std::string text, OptionType type) {
  auto erase_all = [&](const std::string& what) {
    for (size_t at; (at = text.find(what)) != std::string::npos;) text.erase(at, what.size());
  };
  auto replace_all = [&](const std::string& what, const std::string& with) {
    for (size_t at = 0; (at = text.find(what, at)) != std::string::npos; at += with.size()) {
      text.replace(at, what.size(), with);
    }
  };
  erase_all("`");
  replace_all("\n", " ");
  replace_all("\u2013", "-");  // an en dash in a range
  replace_all("<state_dir>", kStateDir);
  if (text == "off") text = "0";
  if (type == OptionType::kInt || type == OptionType::kDuration || type == OptionType::kPortRange) {
    erase_all(" ");
    erase_all(",");
    replace_all("min", "m");
  }
  return text;
}

// The defaults, with the paths derived from kStateDir.
Config Defaults() {
  Config config = DefaultConfig();
  config.state_dir = kStateDir;
  Finalize(&config);
  return config;
}

TEST(ReadmeTest, StatedDefaultsAreTheOptionTables) {
  const std::vector<Fact> facts = Facts();
  // The documents state many defaults; markers that vanished would make this test vacuous.
  EXPECT_GE(facts.size(), 15u);
  std::set<std::string> keys;
  for (const Fact& fact : facts) {
    SCOPED_TRACE(fact.where + ": " + fact.key + " = \"" + fact.text + "\"");
    const OptionSpec* spec = FindSpec(fact.key);
    ASSERT_NE(spec, nullptr) << "no such option";
    const std::string value = Normalize(fact.text, spec->type);
    if (fact.max) {
      ASSERT_EQ(spec->type, OptionType::kInt) << "option-max is for integers";
      EXPECT_EQ(value, std::to_string(spec->max)) << "the option's upper bound";
      continue;
    }
    keys.insert(fact.key);
    Config stated = DefaultConfig();
    stated.state_dir = kStateDir;
    Status s = ApplyOverride(fact.key + "=" + value, &stated);
    ASSERT_TRUE(s.ok()) << s.ToString();
    Finalize(&stated);
    EXPECT_TRUE(stated == Defaults())
        << "the documents state \"" << value << "\"; the option table's default is \""
        << spec->default_text << "\"";
  }
  EXPECT_GE(keys.size(), 10u);
}

// The check above catches drift: a value that is not the default fails it.
TEST(ReadmeTest, AWrongStatedDefaultIsNoticed) {
  Config stated = Defaults();
  ASSERT_TRUE(
      ApplyOverride("ssh.banner_delay=" + Normalize("400 ms", OptionType::kDuration), &stated)
          .ok());
  EXPECT_FALSE(stated == Defaults());
  Config same = Defaults();
  ASSERT_TRUE(
      ApplyOverride("registry.port_range=" + Normalize("28000\u201328999", OptionType::kPortRange),
                    &same)
          .ok());
  EXPECT_TRUE(same == Defaults());
}

// Headings of a Markdown file, without their #s.
std::set<std::string> Headings(const fs::path& doc) {
  std::set<std::string> headings;
  std::istringstream in(ReadText(doc));
  bool fenced = false;
  for (std::string line; std::getline(in, line);) {
    if (line.starts_with("```")) fenced = !fenced;
    if (fenced || !line.starts_with("#")) continue;
    size_t text = line.find_first_not_of('#');
    if (text == std::string::npos || line[text] != ' ') continue;
    headings.insert(line.substr(text + 1));
  }
  return headings;
}

// The comments of a source file, each run of `//` lines joined into one line.
std::vector<std::string> CommentBlocks(const fs::path& file) {
  std::vector<std::string> blocks;
  std::istringstream in(ReadText(file));
  std::string block;
  for (std::string line; std::getline(in, line);) {
    size_t at = line.find("//");
    const bool whole = at != std::string::npos && line.find_first_not_of(' ') == at;
    if (at != std::string::npos) {
      std::string text = line.substr(at + 2);
      if (text.starts_with(' ')) text.erase(0, 1);
      block += (block.empty() ? "" : " ") + text;
    }
    if (!whole && !block.empty()) {
      blocks.push_back(std::move(block));
      block.clear();
    }
  }
  if (!block.empty()) blocks.push_back(std::move(block));
  return blocks;
}

// Comments cite documents as (docs/libraries.md, "Memory BIOs") or (README.md, "How it works");
// a citation may wrap over comment lines. Every document a comment names must exist too.
TEST(ReadmeTest, EverySectionTheSourcesCiteExists) {
  static const std::regex kCitation(R"(((?:docs/)?[A-Za-z_]+\.md), \"([^\"]+)\")");
  static const std::regex kDocument(R"((?:^|[^/\w])((?:docs/[A-Za-z_]+|README)\.md))");
  int citations = 0;
  for (const auto& entry : fs::recursive_directory_iterator(kRoot / "src")) {
    const std::string ext = entry.path().extension().string();
    if (ext != ".h" && ext != ".cc") continue;
    const std::string file = fs::relative(entry.path(), kRoot).string();
    for (const std::string& text : CommentBlocks(entry.path())) {
      if (text.find(".md") == std::string::npos) continue;
      for (std::sregex_iterator it(text.begin(), text.end(), kDocument), end; it != end; ++it) {
        EXPECT_TRUE(fs::exists(kRoot / (*it)[1].str())) << file << " names " << (*it)[1];
      }
      for (std::sregex_iterator it(text.begin(), text.end(), kCitation), end; it != end; ++it) {
        const fs::path doc = kRoot / (*it)[1].str();
        ++citations;
        ASSERT_TRUE(fs::exists(doc)) << file << " cites " << (*it)[1];
        const std::string section = (*it)[2];
        EXPECT_TRUE(Headings(doc).count(section)) << file << " cites " << (*it)[1] << ", \""
                                                  << section << "\", which has no such heading";
      }
    }
  }
  EXPECT_GE(citations, 10);
}

}  // namespace
}  // namespace brokerproxy::cli
