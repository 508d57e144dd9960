#include "proxy/server/sniffer.h"

#include <gtest/gtest.h>

#include <string>

namespace brokerproxy::proxy {
namespace {

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

}  // namespace
}  // namespace brokerproxy::proxy
