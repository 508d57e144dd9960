#include "proxy/server/sniffer.h"

#include <gtest/gtest.h>

#include <string>

namespace brokerproxy::proxy {
namespace {

const std::string kSecret(64, 'a');

TEST(SniffTest, FirstByteDecides) {
  EXPECT_EQ(Sniff(""), Protocol::kNeedMore);
  EXPECT_EQ(Sniff("B"), Protocol::kPlain);
  EXPECT_EQ(Sniff("\x16\x03\x01"), Protocol::kTls);
  EXPECT_EQ(Sniff("SSH-2.0-OpenSSH_9.2"), Protocol::kSsh);
  EXPECT_EQ(Sniff("GET / HTTP/1.1"), Protocol::kHttp);
  EXPECT_EQ(Sniff("OPTIONS * HTTP/1.1"), Protocol::kHttp);
  // A prefix of a method may still become one; anything else is unknown at once.
  EXPECT_EQ(Sniff("G"), Protocol::kNeedMore);
  EXPECT_EQ(Sniff("POST"), Protocol::kNeedMore);
  EXPECT_EQ(Sniff("GEX"), Protocol::kUnknown);
  EXPECT_EQ(Sniff("GET/"), Protocol::kUnknown);
  EXPECT_EQ(Sniff("get / HTTP/1.1"), Protocol::kUnknown);
  EXPECT_EQ(Sniff(std::string(1, '\0')), Protocol::kUnknown);
}

struct PreambleCase {
  std::string name;
  std::string input;
  Preamble::State state;
  std::string job;
  size_t length;
};

void PrintTo(const PreambleCase& c, std::ostream* os) { *os << c.name; }

class PreambleTest : public ::testing::TestWithParam<PreambleCase> {};

TEST_P(PreambleTest, Parses) {
  const PreambleCase& c = GetParam();
  Preamble p = ParsePreamble(c.input);
  EXPECT_EQ(p.state, c.state);
  if (c.state == Preamble::State::kDone) {
    EXPECT_EQ(p.job_id, c.job);
    EXPECT_EQ(p.length, c.length);
  }
}

// Byte-at-a-time delivery: every strict prefix of a good preamble needs more, never fails.
TEST_P(PreambleTest, EveryPrefixOfAGoodOneNeedsMore) {
  const PreambleCase& c = GetParam();
  if (c.state != Preamble::State::kDone) return;
  for (size_t n = 0; n < c.length; ++n) {
    EXPECT_EQ(ParsePreamble(c.input.substr(0, n)).state, Preamble::State::kNeedMore) << n;
  }
}

const std::string kLine = "BROKER1 job-1.x_y " + kSecret + "\n";

INSTANTIATE_TEST_SUITE_P(
    Table, PreambleTest,
    ::testing::Values(
        PreambleCase{"plain", kLine, Preamble::State::kDone, "job-1.x_y", kLine.size()},
        PreambleCase{"crlf", "BROKER1 j " + kSecret + "\r\n", Preamble::State::kDone, "j",
                     12 + kSecret.size()},
        PreambleCase{"payload_after", kLine + "GET / HTTP/1.1\r\n", Preamble::State::kDone,
                     "job-1.x_y", kLine.size()},
        PreambleCase{"wrong_magic", "BROKER2 j " + kSecret + "\n", Preamble::State::kBad, "", 0},
        PreambleCase{"lowercase_magic", "broker1 j ab\n", Preamble::State::kBad, "", 0},
        PreambleCase{"no_secret", "BROKER1 j\n", Preamble::State::kBad, "", 0},
        PreambleCase{"empty_secret", "BROKER1 j \n", Preamble::State::kBad, "", 0},
        PreambleCase{"empty_job", "BROKER1  ab\n", Preamble::State::kBad, "", 0},
        PreambleCase{"slash_in_job", "BROKER1 a/b ab\n", Preamble::State::kBad, "", 0},
        PreambleCase{"upper_hex", "BROKER1 j AB\n", Preamble::State::kBad, "", 0},
        PreambleCase{"space_after_secret", "BROKER1 j ab \n", Preamble::State::kBad, "", 0},
        PreambleCase{"long_job", "BROKER1 " + std::string(65, 'j') + " ab\n", Preamble::State::kBad,
                     "", 0},
        PreambleCase{"max_job", "BROKER1 " + std::string(64, 'j') + " ab\n", Preamble::State::kDone,
                     std::string(64, 'j'), 76},
        PreambleCase{"oversized", "BROKER1 j " + std::string(3000, 'a'), Preamble::State::kBad, "",
                     0},
        PreambleCase{"tls_bytes", "\x16\x03\x01\x02\x00", Preamble::State::kBad, "", 0}),
    [](const auto& info) { return info.param.name; });

// The reader fed one byte at a time (or in any pieces) says what it says of the whole.
TEST_P(PreambleTest, FedInPiecesSaysTheSame) {
  const PreambleCase& c = GetParam();
  Preamble whole = ParsePreamble(c.input);
  for (size_t piece : {1, 2, 3, 10}) {
    PreambleReader reader;
    for (size_t off = 0; off < c.input.size(); off += piece) {
      reader.Feed(std::string_view(c.input).substr(off, piece));
    }
    const Preamble& p = reader.result();
    EXPECT_EQ(p.state, whole.state) << piece;
    EXPECT_EQ(p.job_id, whole.job_id) << piece;
    EXPECT_EQ(p.secret, whole.secret) << piece;
    EXPECT_EQ(p.length, whole.length) << piece;
  }
}

TEST(PreambleReaderTest, TheVerdictIsFinal) {
  PreambleReader reader;
  EXPECT_EQ(reader.Feed("BROKER1 j"), Preamble::State::kNeedMore);
  EXPECT_EQ(reader.Feed(" ab"), Preamble::State::kNeedMore);
  EXPECT_TRUE(reader.result().job_id.empty());  // nothing is reported before the end
  EXPECT_EQ(reader.Feed("\nGARBAGE"), Preamble::State::kDone);
  EXPECT_EQ(reader.Feed("more garbage\n"), Preamble::State::kDone);
  EXPECT_EQ(reader.result().job_id, "j");
  EXPECT_EQ(reader.result().secret, "ab");
  EXPECT_EQ(reader.result().length, 13u);
  PreambleReader bad;
  EXPECT_EQ(bad.Feed("BROKER1 j zz"), Preamble::State::kBad);
  EXPECT_EQ(bad.Feed("\n"), Preamble::State::kBad);
  EXPECT_NE(bad.result().error, nullptr);
}

TEST(PreambleTest, FailsEarlyOnAWrongPrefix) {
  EXPECT_EQ(ParsePreamble("BX").state, Preamble::State::kBad);
  EXPECT_EQ(ParsePreamble("BROKER1 j ab\r").state, Preamble::State::kNeedMore);
  EXPECT_EQ(ParsePreamble("BROKER1 j ab\rx").state, Preamble::State::kBad);
}

TEST(PreambleTest, ExactlyAtTheLimit) {
  // The longest accepted line is kMaxPreambleBytes including the newline.
  std::string secret(kMaxPreambleBytes - std::string("BROKER1 j \n").size(), 'b');
  std::string line = "BROKER1 j " + secret + "\n";
  ASSERT_EQ(line.size(), kMaxPreambleBytes);
  EXPECT_EQ(ParsePreamble(line).state, Preamble::State::kDone);
  EXPECT_EQ(ParsePreamble("BROKER1 j " + secret + "b\n").state, Preamble::State::kBad);
}

TEST(ErrorReplyTest, DocumentedCodes) {
  EXPECT_EQ(ErrorReply(ErrorCode::kDenied), "ERR denied\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kUnavailable), "ERR unavailable\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kBusy), "ERR busy\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kTimeout), "ERR timeout\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kBadRequest), "ERR bad-request\n");
}

}  // namespace
}  // namespace brokerproxy::proxy
