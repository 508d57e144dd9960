#include "loop/address.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <sys/un.h>

#include <cctype>
#include <cstdint>
#include <limits>

namespace brokerproxy {
namespace {

// A short printable name for a table row, so CTest's test names stay readable and stable.
std::string RowName(std::string_view text) {
  std::string out;
  for (char c : text.substr(0, 40)) out += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return out.empty() ? "empty" : out;
}

// ---- HostPort ----

struct GoodHostPort {
  const char* text;
  std::optional<int> default_port;
  bool allow_zero;
  const char* host;
  int port;
};

void PrintTo(const GoodHostPort& c, std::ostream* os) { *os << RowName(c.text); }

class HostPortGoodTest : public testing::TestWithParam<GoodHostPort> {};

TEST_P(HostPortGoodTest, Parses) {
  const GoodHostPort& c = GetParam();
  Result<HostPort> hp = ParseHostPort(c.text, c.default_port, "127.0.0.1", c.allow_zero);
  ASSERT_TRUE(hp.ok()) << c.text << ": " << hp.status().ToString();
  EXPECT_EQ(hp->host, c.host);
  EXPECT_EQ(hp->port, c.port);
}

INSTANTIATE_TEST_SUITE_P(
    Table, HostPortGoodTest,
    testing::Values(GoodHostPort{"127.0.0.1:7000", {}, false, "127.0.0.1", 7000},
                    GoodHostPort{"login1.example.org:22", {}, false, "login1.example.org", 22},
                    GoodHostPort{"my_host-2:65535", {}, false, "my_host-2", 65535},
                    GoodHostPort{"[::1]:7000", {}, false, "::1", 7000},
                    GoodHostPort{"[2001:db8::1]:443", {}, false, "2001:db8::1", 443},
                    GoodHostPort{"[::ffff:10.0.0.1]:80", {}, false, "::ffff:10.0.0.1", 80},
                    GoodHostPort{"0.0.0.0:0", {}, true, "0.0.0.0", 0},
                    GoodHostPort{"[::]:0", {}, true, "::", 0},
                    GoodHostPort{"host:007", {}, false, "host", 7},
                    GoodHostPort{"login1", 7000, false, "login1", 7000},
                    GoodHostPort{"10.1.2.3", 7000, false, "10.1.2.3", 7000},
                    GoodHostPort{"[::1]", 7000, false, "::1", 7000},
                    GoodHostPort{"7001", 7000, false, "127.0.0.1", 7001},
                    GoodHostPort{"0", 7000, true, "127.0.0.1", 0},
                    GoodHostPort{"host:8080", 7000, false, "host", 8080}));

struct BadHostPort {
  const char* text;
  std::optional<int> default_port;
  bool allow_zero;
  const char* why;  // a fragment of the expected message
};

void PrintTo(const BadHostPort& c, std::ostream* os) { *os << RowName(c.text); }

class HostPortBadTest : public testing::TestWithParam<BadHostPort> {};

TEST_P(HostPortBadTest, Rejects) {
  const BadHostPort& c = GetParam();
  Result<HostPort> hp = ParseHostPort(c.text, c.default_port, "127.0.0.1", c.allow_zero);
  ASSERT_FALSE(hp.ok()) << c.text << " parsed as " << hp->ToString();
  EXPECT_EQ(hp.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(hp.status().message().find(c.why), std::string::npos)
      << c.text << ": " << hp.status().message();
}

INSTANTIATE_TEST_SUITE_P(Table, HostPortBadTest,
                         testing::Values(BadHostPort{"", 7000, false, "empty"},
                                         BadHostPort{":7000", {}, false, "empty host"},
                                         BadHostPort{"host", {}, false, "missing port"},
                                         BadHostPort{"host:", {}, false, "port ''"},
                                         BadHostPort{"host:65536", {}, false, "1 to 65535"},
                                         BadHostPort{"host:99999999999", {}, false, "1 to 65535"},
                                         BadHostPort{"host:-1", {}, false, "1 to 65535"},
                                         BadHostPort{"host:+80", {}, false, "1 to 65535"},
                                         BadHostPort{"host:80x", {}, false, "1 to 65535"},
                                         BadHostPort{"host: 80", {}, false, "1 to 65535"},
                                         BadHostPort{"host:0", {}, false, "port 0"},
                                         BadHostPort{"0", 7000, false, "port 0"},
                                         BadHostPort{"70000", 7000, false, "1 to 65535"},
                                         BadHostPort{"::1:7000", {}, false, "brackets"},
                                         BadHostPort{"::1", 7000, false, "brackets"},
                                         BadHostPort{"2001:db8::1:443", {}, false, "brackets"},
                                         BadHostPort{"[::1:7000", {}, false, "unbalanced '['"},
                                         BadHostPort{"::1]:7000", {}, false, "unbalanced ']'"},
                                         BadHostPort{"[::1]7000", {}, false, "after ']'"},
                                         BadHostPort{"[::1]", {}, false, "missing port"},
                                         BadHostPort{"[host]:80", {}, false, "not an IPv6 address"},
                                         BadHostPort{"[]:80", {}, false, "not an IPv6 address"},
                                         BadHostPort{"ho st:80", {}, false, "not a valid host"},
                                         BadHostPort{"host/x:80", {}, false, "not a valid host"}));

// A NUL byte would cut the host short in every C function it reaches.
TEST(HostPortTest, RejectsNulBytes) {
  using namespace std::string_literals;
  for (const std::string& text :
       {"[::\0evil]:7000"s, "host\0evil:7000"s, "host:70\0"s, "127.0.0.1\0:7000"s, "\0"s}) {
    Result<HostPort> hp = ParseHostPort(text, 7000);
    ASSERT_FALSE(hp.ok()) << hp->ToString();
    EXPECT_NE(hp.status().message().find("NUL"), std::string::npos) << hp.status().message();
  }
}

TEST(HostPortTest, ToStringBracketsIpv6AndRoundTrips) {
  EXPECT_EQ((HostPort{"127.0.0.1", 7000}).ToString(), "127.0.0.1:7000");
  EXPECT_EQ((HostPort{"::1", 7000}).ToString(), "[::1]:7000");
  for (const char* text : {"host:1", "[fe80::1]:22", "10.0.0.1:65535"}) {
    Result<HostPort> hp = ParseHostPort(text);
    ASSERT_TRUE(hp.ok()) << text;
    EXPECT_EQ(hp->ToString(), text);
    EXPECT_EQ(*ParseHostPort(hp->ToString()), *hp);
  }
}

TEST(HostPortTest, BareDigitsUseTheDefaultHost) {
  Result<HostPort> hp = ParseHostPort("8000", 7000, "::1");
  ASSERT_TRUE(hp.ok());
  EXPECT_EQ(hp->ToString(), "[::1]:8000");
}

// ---- SplitList ----

TEST(SplitListTest, TrimsItems) {
  Result<std::vector<std::string>> items = SplitList(" a, b ,c\t,d ");
  ASSERT_TRUE(items.ok());
  EXPECT_EQ(*items, (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_EQ(*SplitList("one"), std::vector<std::string>{"one"});
}

TEST(SplitListTest, BlankTextIsTheEmptyList) {
  EXPECT_TRUE(SplitList("")->empty());
  EXPECT_TRUE(SplitList("  ")->empty());
}

TEST(SplitListTest, EmptyItemsAreErrors) {
  for (const char* text : {"a,,b", "a,", ",a", " , ", "a, ,b"}) {
    EXPECT_FALSE(SplitList(text).ok()) << text;
  }
}

// ---- Cidr ----

sockaddr_storage Addr(const char* text) {
  sockaddr_storage ss{};
  auto* in4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (inet_pton(AF_INET, text, &in4->sin_addr) == 1) {
    in4->sin_family = AF_INET;
  } else if (inet_pton(AF_INET6, text, &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
  } else {
    ADD_FAILURE() << "bad test address " << text;
  }
  return ss;
}

bool Matches(const char* net, const char* addr) {
  Result<Cidr> cidr = Cidr::Parse(net);
  EXPECT_TRUE(cidr.ok()) << net << ": " << cidr.status().ToString();
  if (!cidr.ok()) return false;
  sockaddr_storage ss = Addr(addr);
  return cidr->Contains(reinterpret_cast<sockaddr*>(&ss));
}

TEST(CidrTest, ParsesAndNormalisesToString) {
  struct {
    const char* text;
    const char* canonical;
  } cases[] = {
      {"127.0.0.0/8", "127.0.0.0/8"},
      {"10.1.2.3", "10.1.2.3/32"},
      {"0.0.0.0/0", "0.0.0.0/0"},
      {"::1", "::1/128"},
      {"::/0", "::/0"},
      {"2001:DB8::/32", "2001:db8::/32"},
      {"fe80::/10", "fe80::/10"},
      {"::ffff:10.0.0.0/104", "10.0.0.0/8"},  // mapped networks become IPv4 networks
      {"::ffff:192.168.1.7", "192.168.1.7/32"},
      {"10.0.0.0/08", "10.0.0.0/8"},
  };
  for (const auto& c : cases) {
    Result<Cidr> cidr = Cidr::Parse(c.text);
    ASSERT_TRUE(cidr.ok()) << c.text << ": " << cidr.status().ToString();
    EXPECT_EQ(cidr->ToString(), c.canonical) << c.text;
  }
}

TEST(CidrTest, RejectsBadInput) {
  struct {
    const char* text;
    const char* why;
  } cases[] = {
      {"", "missing address"},
      {"/8", "missing address"},
      {"10.0.0.0/", "prefix length"},
      {"10.0.0.0/33", "0 to 32"},
      {"10.0.0.0/-1", "prefix length"},
      {"10.0.0.0/8/8", "prefix length"},
      {"10.0.0.0/ 8", "prefix length"},
      {"::/129", "0 to 128"},
      {"::1/1000", "0 to 128"},
      {"10.0.0", "not an IPv4 or IPv6 address"},
      {"256.0.0.1", "not an IPv4 or IPv6 address"},
      {"localhost", "not an IPv4 or IPv6 address"},
      {"fe80::1%eth0", "not an IPv4 or IPv6 address"},
      {" 10.0.0.1", "not an IPv4 or IPv6 address"},
      {"10.1.2.3/8", "did you mean 10.0.0.0/8?"},
      {"2001:db8::1/32", "did you mean 2001:db8::/32?"},
      {"10.0.0.1/31", "host bits"},
  };
  for (const auto& c : cases) {
    Result<Cidr> cidr = Cidr::Parse(c.text);
    ASSERT_FALSE(cidr.ok()) << c.text;
    EXPECT_NE(cidr.status().message().find(c.why), std::string::npos)
        << c.text << ": " << cidr.status().message();
  }
}

TEST(CidrTest, RejectsNulBytes) {
  using namespace std::string_literals;
  for (const std::string& text : {"10.0.0.0\0/8"s, "::\0evil"s, "10.0.0.0/8\0"s}) {
    Result<Cidr> cidr = Cidr::Parse(text);
    ASSERT_FALSE(cidr.ok()) << cidr->ToString();
    EXPECT_NE(cidr.status().message().find("NUL"), std::string::npos) << cidr.status().message();
  }
}

TEST(CidrTest, MatchesIpv4) {
  EXPECT_TRUE(Matches("127.0.0.0/8", "127.0.0.1"));
  EXPECT_TRUE(Matches("127.0.0.0/8", "127.255.255.255"));
  EXPECT_FALSE(Matches("127.0.0.0/8", "128.0.0.1"));
  EXPECT_TRUE(Matches("10.1.2.3/32", "10.1.2.3"));
  EXPECT_FALSE(Matches("10.1.2.3/32", "10.1.2.4"));
  EXPECT_TRUE(Matches("192.168.4.0/22", "192.168.7.255"));
  EXPECT_FALSE(Matches("192.168.4.0/22", "192.168.8.0"));
  EXPECT_FALSE(Matches("192.168.4.0/22", "192.168.3.255"));
  EXPECT_TRUE(Matches("0.0.0.0/0", "1.2.3.4"));
  EXPECT_TRUE(Matches("0.0.0.0/0", "255.255.255.255"));
}

TEST(CidrTest, MatchesIpv6) {
  EXPECT_TRUE(Matches("::1", "::1"));
  EXPECT_FALSE(Matches("::1/128", "::2"));
  EXPECT_TRUE(Matches("2001:db8::/32", "2001:db8:ffff::1"));
  EXPECT_FALSE(Matches("2001:db8::/32", "2001:db9::1"));
  EXPECT_TRUE(Matches("fe80::/10", "febf::1"));
  EXPECT_FALSE(Matches("fe80::/10", "fec0::1"));
  EXPECT_TRUE(Matches("::/0", "2001:db8::1"));
  EXPECT_TRUE(Matches("2001:db8::1/128", "2001:db8::1"));
}

TEST(CidrTest, MappedIpv4ClientsMatchIpv4Networks) {
  EXPECT_TRUE(Matches("127.0.0.0/8", "::ffff:127.0.0.1"));
  EXPECT_FALSE(Matches("127.0.0.0/8", "::ffff:10.0.0.1"));
  EXPECT_TRUE(Matches("0.0.0.0/0", "::ffff:8.8.8.8"));
  EXPECT_TRUE(Matches("10.1.2.3", "::ffff:10.1.2.3"));
  // A mapped network matches both forms of the client.
  EXPECT_TRUE(Matches("::ffff:10.0.0.0/104", "10.9.9.9"));
  EXPECT_TRUE(Matches("::ffff:10.0.0.0/104", "::ffff:10.9.9.9"));
}

TEST(CidrTest, FamiliesDoNotMix) {
  EXPECT_FALSE(Matches("0.0.0.0/0", "::1"));
  EXPECT_FALSE(Matches("0.0.0.0/0", "::"));
  EXPECT_FALSE(Matches("::1", "127.0.0.1"));
  EXPECT_FALSE(Matches("::/0", "127.0.0.1"));  // IPv4 clients need an IPv4 network
  // IPv4-compatible (::a.b.c.d, deprecated) is not mapped.
  EXPECT_FALSE(Matches("127.0.0.0/8", "::127.0.0.1"));
}

TEST(CidrTest, OtherFamiliesAndNullNeverMatch) {
  Result<Cidr> all = Cidr::Parse("0.0.0.0/0");
  ASSERT_TRUE(all.ok());
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  EXPECT_FALSE(all->Contains(reinterpret_cast<sockaddr*>(&un)));
  EXPECT_FALSE(all->Contains(nullptr));
}

TEST(CidrTest, MatchesAny) {
  std::vector<Cidr> nets;
  for (const char* t : {"127.0.0.0/8", "::1"}) nets.push_back(*Cidr::Parse(t));
  for (const char* a : {"127.0.0.1", "::1", "::ffff:127.1.2.3"}) {
    sockaddr_storage ss = Addr(a);
    EXPECT_TRUE(MatchesAny(nets, reinterpret_cast<sockaddr*>(&ss))) << a;
  }
  for (const char* a : {"10.0.0.1", "::2", "::ffff:10.0.0.1"}) {
    sockaddr_storage ss = Addr(a);
    EXPECT_FALSE(MatchesAny(nets, reinterpret_cast<sockaddr*>(&ss))) << a;
  }
  sockaddr_storage ss = Addr("127.0.0.1");
  EXPECT_FALSE(MatchesAny({}, reinterpret_cast<sockaddr*>(&ss)));
}

// ---- Durations ----

TEST(DurationTest, ParsesUnits) {
  struct {
    const char* text;
    int64_t ms;
  } cases[] = {
      {"0", 0},         {"0s", 0},      {"250ms", 250},   {"30s", 30000},
      {"30", 30000},    {"5m", 300000}, {"2h", 7200000},  {"1d", 86400000},
      {"1500ms", 1500}, {"007s", 7000}, {"90m", 5400000}, {"365d", 31536000000},
  };
  for (const auto& c : cases) {
    Result<int64_t> ms = ParseDuration(c.text);
    ASSERT_TRUE(ms.ok()) << c.text << ": " << ms.status().ToString();
    EXPECT_EQ(*ms, c.ms) << c.text;
  }
}

TEST(DurationTest, RejectsGarbageNegativesAndOverflow) {
  for (const char* text : {"", "-1", "-5s", "+5s", "s", "ms", "5x", "5 s", " 5s", "5s ", "1.5s",
                           "5S", "1h30m", "5sec", "0x10", "9223372036854775808",
                           "9223372036854776s", "106751991168d", "99999999999999999999999ms"}) {
    Result<int64_t> ms = ParseDuration(text);
    EXPECT_FALSE(ms.ok()) << "'" << text << "' parsed as " << *ms;
  }
  // The largest value, in any unit; one more is refused with the bound in the message.
  EXPECT_EQ(*ParseDuration("3650d"), kMaxDurationMs);
  EXPECT_EQ(*ParseDuration("315360000000ms"), kMaxDurationMs);
  for (const char* text : {"3651d", "315360000001ms", "315360001s", "9223372036854775807ms",
                           "9223372036854775s", "106751991167d"}) {
    Result<int64_t> ms = ParseDuration(text);
    ASSERT_FALSE(ms.ok()) << text;
    EXPECT_NE(ms.status().message().find("at most 3650d"), std::string::npos)
        << ms.status().message();
  }
}

TEST(DurationTest, FormatsWithTheLargestExactUnit) {
  EXPECT_EQ(FormatDuration(0), "0");
  EXPECT_EQ(FormatDuration(1), "1ms");
  EXPECT_EQ(FormatDuration(1500), "1500ms");
  EXPECT_EQ(FormatDuration(30000), "30s");
  EXPECT_EQ(FormatDuration(60000), "1m");
  EXPECT_EQ(FormatDuration(300000), "5m");
  EXPECT_EQ(FormatDuration(5400000), "90m");
  EXPECT_EQ(FormatDuration(7200000), "2h");
  EXPECT_EQ(FormatDuration(86400000), "1d");
  EXPECT_EQ(FormatDuration(90000000), "25h");
}

TEST(DurationTest, FormatParsesBack) {
  for (int64_t ms :
       {int64_t{0}, int64_t{1}, int64_t{999}, int64_t{1000}, int64_t{61000}, int64_t{3600000},
        int64_t{86400000} * 400, int64_t{123456789}, kMaxDurationMs}) {
    Result<int64_t> back = ParseDuration(FormatDuration(ms));
    ASSERT_TRUE(back.ok()) << FormatDuration(ms);
    EXPECT_EQ(*back, ms);
  }
}

}  // namespace
}  // namespace brokerproxy
