// ParseClientHello and ClientHelloReader against real ClientHellos captured from OpenSSL
// in-process (a client with memory BIOs; its first flight is the hello), re-fragmented,
// truncated and damaged; the reader fed in pieces of every size, with its work counted.

#include "proxy/tls/client_hello.h"

#include <gtest/gtest.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "support/tls_samples.h"

namespace brokerproxy::proxy {
namespace {

using State = ClientHello::State;
using Verdict = ClientHelloReader::Verdict;

using testing::CaptureClientHello;
using testing::FragmentHandshake;

// The handshake bytes of a single-record flight.
std::string HandshakeOf(const std::string& record) { return record.substr(5); }

// A ClientHello body built by hand: version, random, session id, suites, compression and the
// given extensions block (omitted if `extensions` is null).
std::string HandHello(const std::string* extensions, size_t session_id_len = 0) {
  std::string body = "\x03\x03" + std::string(32, 'r');
  body += static_cast<char>(session_id_len);
  body += std::string(session_id_len, 's');
  body += std::string("\x00\x02\x13\x01", 4);  // one suite
  body += std::string("\x01\x00", 2);          // null compression
  if (extensions) {
    body += static_cast<char>(extensions->size() >> 8);
    body += static_cast<char>(extensions->size() & 0xff);
    body += *extensions;
  }
  std::string hs = std::string{1, static_cast<char>(body.size() >> 16),
                               static_cast<char>((body.size() >> 8) & 0xff),
                               static_cast<char>(body.size() & 0xff)} +
                   body;
  return hs;
}

std::string SniExtension(const std::string& name) {
  std::string entry =
      std::string{0, static_cast<char>(name.size() >> 8), static_cast<char>(name.size() & 0xff)} +
      name;
  std::string list =
      std::string{static_cast<char>(entry.size() >> 8), static_cast<char>(entry.size() & 0xff)} +
      entry;
  return std::string{0, 0, static_cast<char>(list.size() >> 8),
                     static_cast<char>(list.size() & 0xff)} +
         list;
}

TEST(ClientHelloTest, RealHelloWithSni) {
  std::string hello = CaptureClientHello("job-42.example.org");
  ASSERT_GT(hello.size(), 100u);
  ClientHello h = ParseClientHello(hello);
  EXPECT_EQ(h.state, State::kSni) << (h.error ? h.error : "");
  EXPECT_EQ(h.sni, "job-42.example.org");
}

TEST(ClientHelloTest, RealTls12HelloWithSni) {
  ClientHello h = ParseClientHello(CaptureClientHello("a.localhost", TLS1_2_VERSION));
  EXPECT_EQ(h.state, State::kSni);
  EXPECT_EQ(h.sni, "a.localhost");
}

TEST(ClientHelloTest, RealHelloWithoutSni) {
  ClientHello h = ParseClientHello(CaptureClientHello(nullptr));
  EXPECT_EQ(h.state, State::kNoSni);
  EXPECT_TRUE(h.sni.empty());
}

TEST(ClientHelloTest, UpperCaseIsFolded) {
  ClientHello h = ParseClientHello(CaptureClientHello("Job.LocalHost"));
  EXPECT_EQ(h.state, State::kSni);
  EXPECT_EQ(h.sni, "job.localhost");
}

TEST(ClientHelloTest, EveryStrictPrefixNeedsMore) {
  for (const char* sni : {"job.localhost", static_cast<const char*>(nullptr)}) {
    std::string hello = CaptureClientHello(sni);
    for (size_t n = 0; n < hello.size(); ++n) {
      ClientHello h = ParseClientHello(std::string_view(hello).substr(0, n));
      ASSERT_EQ(h.state, State::kNeedMore)
          << "prefix " << n << " of " << hello.size() << ": " << (h.error ? h.error : "");
    }
  }
}

TEST(ClientHelloTest, FragmentedIntoSmallRecords) {
  std::string hs = HandshakeOf(CaptureClientHello("frag.localhost"));
  for (size_t size : {1, 2, 3, 7, 64, 100}) {
    std::string stream = FragmentHandshake(hs, size);
    ClientHello h = ParseClientHello(stream);
    EXPECT_EQ(h.state, State::kSni) << "records of " << size;
    EXPECT_EQ(h.sni, "frag.localhost");
    // And every prefix of the fragmented stream still needs more.
    for (size_t n = 0; n < stream.size(); n += 13) {
      ASSERT_EQ(ParseClientHello(std::string_view(stream).substr(0, n)).state, State::kNeedMore)
          << "records of " << size << ", prefix " << n;
    }
  }
}

TEST(ClientHelloTest, BytesAfterTheHelloAreIgnored) {
  std::string hello = CaptureClientHello("x.localhost") + std::string("\x17\x03\x03\x00\x10", 5) +
                      std::string(16, 'e');
  ClientHello h = ParseClientHello(hello);
  EXPECT_EQ(h.state, State::kSni);
  EXPECT_EQ(h.sni, "x.localhost");
}

TEST(ClientHelloTest, HandBuiltHellos) {
  std::string ext = SniExtension("hand.localhost");
  EXPECT_EQ(ParseClientHello(FragmentHandshake(HandHello(&ext), 16384)).sni, "hand.localhost");
  EXPECT_EQ(ParseClientHello(FragmentHandshake(HandHello(nullptr), 16384)).state, State::kNoSni);
  std::string empty;
  EXPECT_EQ(ParseClientHello(FragmentHandshake(HandHello(&empty), 16384)).state, State::kNoSni);
  // Another extension before the server name.
  std::string two = std::string("\x00\x0b\x00\x02\x01\x00", 6) + ext;
  EXPECT_EQ(ParseClientHello(FragmentHandshake(HandHello(&two), 16384)).sni, "hand.localhost");
}

TEST(ClientHelloTest, MalformedLengths) {
  std::string record = CaptureClientHello("job.localhost");
  auto damaged = [&](size_t at, char value) {
    std::string d = record;
    d[at] = value;
    return ParseClientHello(d).state;
  };
  EXPECT_EQ(damaged(0, 0x17), State::kMalformed);  // not a handshake record
  EXPECT_EQ(damaged(1, 0x02), State::kMalformed);  // record version
  EXPECT_EQ(damaged(3, 0x41), State::kMalformed);  // record longer than 2^14
  EXPECT_EQ(damaged(5, 0x02), State::kMalformed);  // handshake type ServerHello
  EXPECT_EQ(damaged(6, 0x01), State::kMalformed);  // handshake longer than the buffer
  // session_id length 33 (offset: 5 record + 4 handshake + 2 version + 32 random).
  EXPECT_EQ(damaged(5 + 4 + 34, 33), State::kMalformed);

  std::string ext = SniExtension("job.localhost");
  std::string hs = HandHello(&ext);
  // Extensions length one too long / one too short.
  size_t ext_len_at = 4 + 2 + 32 + 1 + 4 + 2;
  std::string longer = hs;
  longer[ext_len_at + 1] = static_cast<char>(longer[ext_len_at + 1] + 1);
  EXPECT_EQ(ParseClientHello(FragmentHandshake(longer, 16384)).state, State::kMalformed);
  std::string shorter = hs;
  shorter[ext_len_at + 1] = static_cast<char>(shorter[ext_len_at + 1] - 1);
  EXPECT_EQ(ParseClientHello(FragmentHandshake(shorter, 16384)).state, State::kMalformed);
  // Server name list longer than its extension.
  std::string bad_list = hs;
  bad_list[ext_len_at + 2 + 4 + 1] = 0x7f;
  EXPECT_EQ(ParseClientHello(FragmentHandshake(bad_list, 16384)).state, State::kMalformed);
  // Odd cipher suites length.
  std::string odd = HandHello(&ext);
  odd[4 + 2 + 32 + 1 + 1] = 3;
  EXPECT_EQ(ParseClientHello(FragmentHandshake(odd, 16384)).state, State::kMalformed);
  // Session id of 33 bytes, consistently encoded.
  EXPECT_EQ(ParseClientHello(FragmentHandshake(HandHello(&ext, 33), 16384)).state,
            State::kMalformed);
  // Empty record; zero-length handshake.
  EXPECT_EQ(ParseClientHello(std::string("\x16\x03\x01\x00\x00", 5)).state, State::kMalformed);
  EXPECT_EQ(ParseClientHello(std::string("\x16\x03\x01\x00\x04\x01\x00\x00\x00", 9)).state,
            State::kMalformed);
}

TEST(ClientHelloTest, BadServerNames) {
  for (const std::string& name :
       {std::string("bad name"), std::string("a/b"), std::string("x\0y", 3), std::string("."),
        std::string("trailing."), std::string(300, 'a')}) {
    std::string ext = SniExtension(name);
    EXPECT_EQ(ParseClientHello(FragmentHandshake(HandHello(&ext), 16384)).state, State::kMalformed)
        << name;
  }
  std::string twice = SniExtension("a.localhost") + SniExtension("b.localhost");
  EXPECT_EQ(ParseClientHello(FragmentHandshake(HandHello(&twice), 16384)).state, State::kMalformed);
}

TEST(ClientHelloTest, OversizedIsMalformed) {
  // A handshake length that could never fit the buffer is refused at once.
  EXPECT_EQ(ParseClientHello(std::string("\x16\x03\x01\x00\x04\x01\x00\x40\x00", 9)).state,
            State::kMalformed);
  // A hello that fits one record but, cut into 1-byte records, outgrows the buffer.
  std::string pad(12000, '\0');
  std::string ext = std::string("\x00\x15", 2) + static_cast<char>(pad.size() >> 8) +
                    static_cast<char>(pad.size() & 0xff) + pad + SniExtension("big.localhost");
  std::string hs = HandHello(&ext);
  EXPECT_EQ(ParseClientHello(FragmentHandshake(hs, 16384)).sni, "big.localhost");
  std::string many = FragmentHandshake(hs, 1);
  ASSERT_GT(many.size(), kMaxClientHelloBuffer);
  EXPECT_EQ(ParseClientHello(std::string_view(many).substr(0, kMaxClientHelloBuffer - 1)).state,
            State::kNeedMore);
  EXPECT_EQ(ParseClientHello(std::string_view(many).substr(0, kMaxClientHelloBuffer)).state,
            State::kMalformed);
}

TEST(ClientHelloTest, GarbageNeverCrashes) {
  std::mt19937 rng(7);
  std::string real = CaptureClientHello("fuzz.localhost");
  for (int i = 0; i < 20000; ++i) {
    std::string input;
    if (i % 2 == 0) {
      size_t n = rng() % 600;
      for (size_t k = 0; k < n; ++k) input += static_cast<char>(rng());
      if (!input.empty() && i % 4 == 0) input[0] = 22;
    } else {
      input = real;
      for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) {
        input[rng() % input.size()] = static_cast<char>(rng());
      }
    }
    ClientHello h = ParseClientHello(input);
    if (h.state == State::kSni) {
      EXPECT_FALSE(h.sni.empty());
    }
    if (h.state == State::kMalformed) {
      EXPECT_NE(h.error, nullptr);
    }
  }
}

// A hand-built hello naming `name`, padded (extension 21) to `size` handshake bytes.
std::string PaddedHello(size_t size, const std::string& name) {
  std::string sni = SniExtension(name);
  size_t fixed = HandHello(&sni).size() + 4;
  std::string pad(size - fixed, '\0');
  std::string ext = std::string("\x00\x15", 2) + static_cast<char>(pad.size() >> 8) +
                    static_cast<char>(pad.size() & 0xff) + pad + sni;
  std::string hs = HandHello(&ext);
  EXPECT_EQ(hs.size(), size);
  return hs;
}

// Feeds `input` in pieces of `piece` bytes (0: all at once); returns the reader.
ClientHelloReader FeedInPieces(std::string_view input, size_t piece) {
  ClientHelloReader reader;
  if (piece == 0) {
    reader.Feed(input);
    return reader;
  }
  for (size_t off = 0; off < input.size() && reader.verdict() == Verdict::kNeedMore; off += piece) {
    reader.Feed(input.substr(off, piece));
  }
  return reader;
}

TEST(ClientHelloReaderTest, VerdictsNameTheFailure) {
  EXPECT_EQ(FeedInPieces("GET / HTTP/1.1\r\n", 0).verdict(), Verdict::kNotTls);
  EXPECT_EQ(FeedInPieces(std::string("\x16\x07", 2), 0).verdict(), Verdict::kNotTls);
  ClientHelloReader huge = FeedInPieces(std::string("\x16\x03\x01\x00\x04\x01\x00\x40\x00", 9), 1);
  EXPECT_EQ(huge.verdict(), Verdict::kTooLarge);
  EXPECT_TRUE(huge.failed());
  EXPECT_NE(huge.error(), nullptr);
  // A record type that is not handshake after the first record breaks the hello.
  std::string hs = HandshakeOf(CaptureClientHello("a.localhost"));
  std::string stream = FragmentHandshake(hs.substr(0, 10), 10) + std::string("\x17\x03\x03", 3);
  EXPECT_EQ(FeedInPieces(stream, 0).verdict(), Verdict::kMalformed);
  // A padded hello that fits one record but not the buffer once cut into 1-byte records.
  std::string big = FragmentHandshake(PaddedHello(12000, "big.localhost"), 1);
  EXPECT_EQ(FeedInPieces(big, 0).verdict(), Verdict::kTooLarge);
  EXPECT_EQ(FeedInPieces(big, 1).verdict(), Verdict::kTooLarge);
  EXPECT_EQ(FeedInPieces(FragmentHandshake(PaddedHello(12000, "big.localhost"), 16384), 1).sni(),
            "big.localhost");
}

TEST(ClientHelloReaderTest, GarbageFailsAtTheFirstWrongByte) {
  // A session_id length of 33 is refused when it arrives, not when the hello is complete.
  std::string record = CaptureClientHello("job.localhost");
  std::string prefix = record.substr(0, 5 + 4 + 34) + '\x21';
  EXPECT_EQ(FeedInPieces(prefix, 1).verdict(), Verdict::kMalformed);
  // So is a ServerHello's type.
  EXPECT_EQ(FeedInPieces(std::string("\x16\x03\x03\x00\x40\x02", 6), 0).verdict(),
            Verdict::kMalformed);
}

TEST(ClientHelloReaderTest, TheVerdictIsFinalAndNothingMoreIsExamined) {
  std::string hello = CaptureClientHello("done.localhost");
  ClientHelloReader reader;
  EXPECT_EQ(reader.Feed(hello), Verdict::kSni);
  uint64_t steps = reader.steps();
  EXPECT_EQ(reader.Feed("garbage"), Verdict::kSni);
  EXPECT_EQ(reader.Feed(std::string(100000, 'x')), Verdict::kSni);
  EXPECT_EQ(reader.steps(), steps);
  EXPECT_EQ(reader.sni(), "done.localhost");
  EXPECT_EQ(reader.error(), nullptr);
}

// A name read before the hello ends is no verdict yet: the rest may still break the hello.
TEST(ClientHelloReaderTest, TheNameIsReportedOnlyWithTheVerdict) {
  std::string hello = CaptureClientHello("late.localhost");
  ClientHelloReader reader;
  for (size_t i = 0; i + 1 < hello.size(); ++i) {
    ASSERT_EQ(reader.Feed(std::string_view(hello).substr(i, 1)), Verdict::kNeedMore);
    ASSERT_TRUE(reader.sni().empty()) << "after " << i + 1 << " bytes";
  }
  EXPECT_EQ(reader.Feed(std::string_view(hello).substr(hello.size() - 1)), Verdict::kSni);
  EXPECT_EQ(reader.sni(), "late.localhost");
}

// However the input is split, the reader says what it says of the whole: real hellos, records
// of every size, and damaged copies.
TEST(ClientHelloReaderTest, SplittingTheInputNeverChangesTheVerdict) {
  std::mt19937 rng(11);
  std::vector<std::string> inputs;
  for (const char* sni : {"split.localhost", static_cast<const char*>(nullptr)}) {
    std::string hs = HandshakeOf(CaptureClientHello(sni));
    for (size_t size : {1, 2, 5, 64, 16384}) inputs.push_back(FragmentHandshake(hs, size));
  }
  for (int i = 0; i < 400; ++i) {
    std::string damaged = inputs[rng() % inputs.size()];
    for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k) {
      damaged[rng() % damaged.size()] = static_cast<char>(rng());
    }
    inputs.push_back(damaged);
  }
  for (const std::string& input : inputs) {
    ClientHelloReader whole = FeedInPieces(input, 0);
    for (size_t piece : {1, 2, 3, 7, 100}) {
      ClientHelloReader split = FeedInPieces(input, piece);
      ASSERT_EQ(split.verdict(), whole.verdict()) << "pieces of " << piece;
      ASSERT_EQ(split.sni(), whole.sni());
    }
    // Random cuts as well.
    ClientHelloReader reader;
    for (size_t off = 0; off < input.size();) {
      size_t n = 1 + rng() % 40;
      reader.Feed(std::string_view(input).substr(off, n));
      off += n;
    }
    ASSERT_EQ(reader.verdict(), whole.verdict());
    ASSERT_EQ(reader.sni(), whole.sni());
  }
}

// The work of reading a hello is linear in its size, however finely it is split: 16 KiB in
// 1-byte records, whole and one byte per read, and a 16 KiB record one byte per read. Parsing
// the whole buffer again on every read would take about n^2 / 2 steps (over 10^8 here).
TEST(ClientHelloReaderTest, WorkIsLinearInTheInputHoweverItIsSplit) {
  const size_t kHandshakeBytes = (kMaxClientHelloBuffer - 1) / 6;  // 1-byte records fit
  std::string tiny_records = FragmentHandshake(PaddedHello(kHandshakeBytes, "w.localhost"), 1);
  ASSERT_GE(tiny_records.size(), 16000u);
  ASSERT_LE(tiny_records.size(), kMaxClientHelloBuffer);
  std::string one_record =
      FragmentHandshake(PaddedHello(kMaxClientHelloBuffer - 5, "w.localhost"), 16384);
  ASSERT_EQ(one_record.size(), kMaxClientHelloBuffer);
  // Declares 12,000 bytes, sent in 1-byte records: refused at the buffer's bound.
  std::string too_large = FragmentHandshake(PaddedHello(12000, "w.localhost"), 1);
  struct Case {
    const char* name;
    const std::string& input;
    size_t piece;
    Verdict verdict;
  };
  for (const Case& c : {Case{"1-byte records, one read", tiny_records, 0, Verdict::kSni},
                        Case{"1-byte records, 1-byte reads", tiny_records, 1, Verdict::kSni},
                        Case{"1-byte records, 2-byte reads", tiny_records, 2, Verdict::kSni},
                        Case{"one record, 1-byte reads", one_record, 1, Verdict::kSni},
                        Case{"too large, 1-byte reads", too_large, 1, Verdict::kTooLarge}}) {
    ClientHelloReader reader = FeedInPieces(c.input, c.piece);
    EXPECT_EQ(reader.verdict(), c.verdict) << c.name;
    size_t examined = std::min(c.input.size(), kMaxClientHelloBuffer);
    EXPECT_LE(reader.steps(), 3 * examined + 64) << c.name << ": " << examined << " bytes";
    std::printf("[ metric ] ClientHello reader, %s: %llu steps for %zu bytes\n", c.name,
                static_cast<unsigned long long>(reader.steps()), examined);
  }
}

}  // namespace
}  // namespace brokerproxy::proxy
