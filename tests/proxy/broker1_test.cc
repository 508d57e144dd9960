// The BROKER1 wire format, both directions: the encoders and the bounded incremental parsers
// round-trip, every malformed class fails, any split of the stream gives the same verdict.

#include "proxy/wire/broker1.h"

#include <gtest/gtest.h>

#include <string>

namespace brokerproxy::proxy {
namespace {

const std::string kSecret(64, 'a');

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

// ---- Preamble round trips ----

TEST(PreambleRoundTripTest, EncodedLinesParseBack) {
  const std::string longest_job(kMaxJobIdChars, 'J');
  // The longest secret that still fits the line with the longest job id.
  const std::string longest_secret(kMaxPreambleBytes - EncodePreamble(longest_job, "").size(), 'f');
  struct Case {
    std::string job, secret;
  } cases[] = {{"j", "0"},
               {"job-1.x_y", kSecret},
               {"ABC.def_-0", "0123456789abcdef"},
               {longest_job, "a"},
               {"j", std::string(kMaxPreambleBytes - EncodePreamble("j", "").size(), 'e')},
               {longest_job, longest_secret}};
  for (const Case& c : cases) {
    std::string line = EncodePreamble(c.job, c.secret);
    ASSERT_LE(line.size(), kMaxPreambleBytes) << c.job;
    EXPECT_TRUE(line.starts_with(kPreambleMagic));
    EXPECT_TRUE(line.ends_with("\n"));
    for (size_t piece : {size_t{1}, size_t{7}, line.size()}) {
      PreambleReader reader;
      for (size_t off = 0; off < line.size(); off += piece) {
        reader.Feed(std::string_view(line).substr(off, piece));
      }
      ASSERT_EQ(reader.state(), Preamble::State::kDone) << c.job << " / " << piece;
      EXPECT_EQ(reader.result().job_id, c.job);
      EXPECT_EQ(reader.result().secret, c.secret);
      EXPECT_EQ(reader.result().length, line.size());
    }
  }
}

TEST(PreambleRoundTripTest, OneByteOverEitherLimitFails) {
  std::string long_job(kMaxJobIdChars + 1, 'j');
  EXPECT_EQ(ParsePreamble(EncodePreamble(long_job, "ab")).state, Preamble::State::kBad);
  std::string fits(kMaxPreambleBytes - EncodePreamble("j", "").size(), 'b');
  EXPECT_EQ(ParsePreamble(EncodePreamble("j", fits)).state, Preamble::State::kDone);
  EXPECT_EQ(ParsePreamble(EncodePreamble("j", fits + "b")).state, Preamble::State::kBad);
}

TEST(PreambleRoundTripTest, Alphabets) {
  for (int i = 0; i < 256; ++i) {
    char c = static_cast<char>(i);
    bool job = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               c == '.' || c == '_' || c == '-';
    bool secret = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
    EXPECT_EQ(IsJobIdChar(c), job) << i;
    EXPECT_EQ(IsSecretChar(c), secret) << i;
    // The parser agrees with the predicates.
    Preamble::State as_job = ParsePreamble(EncodePreamble(std::string(1, c), "ab")).state;
    if (c != ' ') {
      EXPECT_EQ(as_job == Preamble::State::kDone, job) << i;
    }
    if (c != '\n' && c != '\r') {
      Preamble::State as_secret = ParsePreamble(EncodePreamble("j", std::string(1, c))).state;
      EXPECT_EQ(as_secret == Preamble::State::kDone, secret) << i;
    }
  }
}

// ---- Replies ----

TEST(ReplyTest, EveryCodeRoundTrips) {
  const ErrorCode codes[] = {ErrorCode::kDenied, ErrorCode::kUnavailable, ErrorCode::kBusy,
                             ErrorCode::kTimeout, ErrorCode::kBadRequest};
  for (ErrorCode code : codes) {
    std::string_view wire = EncodeReply(code);
    EXPECT_EQ(wire, ErrorReply(code));
    EXPECT_EQ(wire, "ERR " + std::string(ErrorCodeName(code)) + "\n");
    ASSERT_LE(wire.size(), kMaxReplyLine);
    ReplyReader reader;
    EXPECT_EQ(reader.Feed(wire), wire.size());
    ASSERT_EQ(reader.state(), ReplyReader::State::kDone);
    EXPECT_EQ(reader.reply().kind, Reply::Kind::kError);
    EXPECT_EQ(reader.reply().error, code);
    EXPECT_EQ(reader.reply().line, wire.substr(0, wire.size() - 1));
  }
  EXPECT_EQ(EncodeReply(std::nullopt), kReplyOk);
  ReplyReader ok;
  EXPECT_EQ(ok.Feed(kReplyOk), kReplyOk.size());
  ASSERT_EQ(ok.state(), ReplyReader::State::kDone);
  EXPECT_EQ(ok.reply().kind, Reply::Kind::kOk);
  EXPECT_FALSE(ok.reply().error.has_value());
}

TEST(ReplyTest, DocumentedWireStrings) {
  EXPECT_EQ(kReplyOk, "OK\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kDenied), "ERR denied\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kUnavailable), "ERR unavailable\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kBusy), "ERR busy\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kTimeout), "ERR timeout\n");
  EXPECT_EQ(ErrorReply(ErrorCode::kBadRequest), "ERR bad-request\n");
}

TEST(ReplyTest, ConsumesNothingPastTheNewline) {
  ReplyReader reader;
  std::string stream = "OK\r\nHTTP/1.1 200 OK\r\n";
  EXPECT_EQ(reader.Feed(stream), 4u);
  EXPECT_EQ(reader.reply().kind, Reply::Kind::kOk);  // the '\r' is accepted
  EXPECT_EQ(reader.Feed("more"), 0u);                // final
  EXPECT_EQ(reader.state(), ReplyReader::State::kDone);
}

TEST(ReplyTest, ByteAtATimeSaysTheSame) {
  for (std::string line : {std::string("OK\n"), std::string("ERR busy\n"),
                           std::string("ERR unavailable\r\n"), std::string("HELLO\n")}) {
    ReplyReader whole;
    whole.Feed(line + "tail");
    ReplyReader bytes;
    size_t took = 0;
    for (char c : line + "tail") took += bytes.Feed(std::string_view(&c, 1));
    EXPECT_EQ(took, line.size()) << line;
    ASSERT_EQ(bytes.state(), ReplyReader::State::kDone) << line;
    EXPECT_EQ(bytes.reply().kind, whole.reply().kind) << line;
    EXPECT_EQ(bytes.reply().error, whole.reply().error) << line;
    EXPECT_EQ(bytes.reply().line, whole.reply().line) << line;
  }
}

TEST(ReplyTest, MalformedLinesAreUnknown) {
  const std::string_view lines[] = {"",
                                    "ok",
                                    "OK ",
                                    " OK",
                                    "OKAY",
                                    "ERR",
                                    "ERR ",
                                    "ERR  denied",
                                    "ERR denied ",
                                    "ERR DENIED",
                                    "ERR nosuchcode",
                                    "err denied",
                                    "ERR denied\rx",
                                    std::string_view("O\0K", 3)};
  for (std::string_view line : lines) {
    Reply r = ParseReply(line);
    EXPECT_EQ(r.kind, Reply::Kind::kUnknown) << line;
    EXPECT_FALSE(r.error.has_value()) << line;
    EXPECT_EQ(ReplyStatus(r, "j").code(), Status::Code::kIOError) << line;
    EXPECT_FALSE(WorthRefetchingSecret(r)) << line;
  }
}

TEST(ReplyTest, ALineWithoutANewlineIsBoundedByTheLimit) {
  ReplyReader reader;
  std::string junk(kMaxReplyLine - 1, 'x');
  EXPECT_EQ(reader.Feed(junk), junk.size());
  EXPECT_EQ(reader.state(), ReplyReader::State::kNeedMore);
  EXPECT_EQ(reader.Feed("yz\n"), 1u);  // takes only up to the limit
  EXPECT_EQ(reader.state(), ReplyReader::State::kBad);
  EXPECT_EQ(reader.Feed("\n"), 0u);
  // A line of exactly the limit, newline included, is still read.
  ReplyReader edge;
  std::string at_limit(kMaxReplyLine - 1, 'x');
  EXPECT_EQ(edge.Feed(at_limit + "\n"), kMaxReplyLine);
  ASSERT_EQ(edge.state(), ReplyReader::State::kDone);
  EXPECT_EQ(edge.reply().kind, Reply::Kind::kUnknown);
}

TEST(ReplyTest, StatusAPersonCanActOn) {
  struct Case {
    std::string_view line;
    Status::Code code;
    std::string_view mentions;
    bool refetch;
  } cases[] = {
      {"OK", Status::Code::kOk, "", false},
      {"ERR denied", Status::Code::kPermissionDenied, "unknown job or wrong secret", true},
      {"ERR unavailable", Status::Code::kUnavailable, "does not accept connections", false},
      {"ERR busy", Status::Code::kResourceExhausted, "try again", true},
      {"ERR timeout", Status::Code::kTimeout, "timed out", false},
      {"ERR bad-request", Status::Code::kInvalidArgument, "did not understand", false},
  };
  for (const Case& c : cases) {
    Reply r = ParseReply(c.line);
    Status s = ReplyStatus(r, "myjob");
    EXPECT_EQ(s.code(), c.code) << c.line;
    EXPECT_NE(s.message().find(c.mentions), std::string::npos) << s.ToString();
    if (!s.ok()) {
      EXPECT_NE(s.message().find(c.line), std::string::npos) << s.ToString();
    }
    EXPECT_EQ(WorthRefetchingSecret(r), c.refetch) << c.line;
  }
  // A long unexpected line is quoted only in part.
  Status s = ReplyStatus(ParseReply(std::string(kMaxReplyLine - 1, 'x')), "j");
  EXPECT_LT(s.message().size(), 200u);
}

}  // namespace
}  // namespace brokerproxy::proxy
