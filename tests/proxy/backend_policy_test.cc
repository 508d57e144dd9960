#include "proxy/server/backend_policy.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>

#include "e2e/harness.h"
#include "loop/work.h"
#include "support/socket_as.h"

namespace brokerproxy::proxy {
namespace {

sockaddr_storage Addr(const std::string& host, int port) {
  auto a = loop::ParseNumericAddress(host, port);
  EXPECT_TRUE(a) << host;
  return a.value_or(sockaddr_storage{});
}

std::vector<Cidr> Nets(std::initializer_list<const char*> texts) {
  std::vector<Cidr> out;
  for (const char* t : texts) out.push_back(*Cidr::Parse(t));
  return out;
}

Status::Code Check(const BackendPolicy& p, const std::string& host, int port) {
  return p.CheckAddress(Addr(host, port)).code();
}

constexpr Status::Code kOk = Status::Code::kOk;
constexpr Status::Code kDenied = Status::Code::kPermissionDenied;

// A non-loopback address of this machine, if it has one.
std::optional<std::string> InterfaceAddress() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return std::nullopt;
  std::optional<std::string> out;
  for (ifaddrs* i = list; i && !out; i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
    sockaddr_storage s{};
    std::memcpy(&s, i->ifa_addr, sizeof(sockaddr_in));
    if (IsLoopback(s)) continue;
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&s)->sin_addr, buf, sizeof(buf));
    out = buf;
  }
  ::freeifaddrs(list);
  return out;
}

TEST(BackendPolicyTest, TheUnspecifiedAddressNamesNoHost) {
  BackendPolicy p;
  for (const char* host : {"0.0.0.0", "::", "::ffff:0.0.0.0"}) {
    EXPECT_EQ(Check(p, host, 80), kDenied) << host;
  }
}

TEST(BackendPolicyTest, TheProxysOwnListenersInEverySpelling) {
  BackendPolicy p;
  p.set_own_listeners({Addr("127.0.0.1", 7000), Addr("::", 7443)});
  EXPECT_EQ(Check(p, "127.0.0.1", 7000), kDenied);
  EXPECT_EQ(Check(p, "::ffff:127.0.0.1", 7000), kDenied);
  EXPECT_EQ(Check(p, "127.0.0.2", 7000), kOk);  // that listener is on 127.0.0.1 only
  EXPECT_EQ(Check(p, "127.0.0.1", 7001), kOk);
  EXPECT_EQ(Check(p, "127.0.0.1", 0), kOk);  // port not allocated yet
  // A wildcard listener is every local address on its port, whatever the family.
  EXPECT_EQ(Check(p, "::1", 7443), kDenied);
  EXPECT_EQ(Check(p, "127.9.9.9", 7443), kDenied);
  EXPECT_EQ(Check(p, "192.0.2.1", 7443), kOk);  // another host's port 7443
  if (auto own = InterfaceAddress()) {
    EXPECT_EQ(Check(p, *own, 7443), kDenied) << *own;
  }
}

TEST(BackendPolicyTest, AllowListGovernsOtherHostsOnly) {
  BackendPolicy everyone;
  EXPECT_EQ(Check(everyone, "192.0.2.1", 22), kOk);
  BackendPolicy nobody(std::vector<Cidr>{});
  EXPECT_EQ(Check(nobody, "192.0.2.1", 22), kDenied);
  EXPECT_EQ(Check(nobody, "127.0.0.1", 22), kOk);  // this node: the owner check's business
  BackendPolicy compute(Nets({"198.51.100.0/24", "2001:db8::/32"}));
  EXPECT_EQ(Check(compute, "198.51.100.9", 22), kOk);
  EXPECT_EQ(Check(compute, "::ffff:198.51.100.9", 22), kOk);
  EXPECT_EQ(Check(compute, "2001:db8::5", 22), kOk);
  EXPECT_EQ(Check(compute, "192.0.2.1", 22), kDenied);
  EXPECT_EQ(Check(compute, "::ffff:192.0.2.1", 22), kDenied);
  EXPECT_EQ(Check(compute, "2001:db9::5", 22), kDenied);
  EXPECT_EQ(Check(compute, "::1", 22), kOk);
  if (auto own = InterfaceAddress()) {
    EXPECT_EQ(Check(compute, *own, 22), kOk) << *own;
  }
}

TEST(BackendPolicyTest, IsLocal) {
  BackendPolicy p;
  for (const char* host : {"127.0.0.1", "127.5.5.5", "::1", "::ffff:127.0.0.1", "0.0.0.0"}) {
    EXPECT_TRUE(p.IsLocal(Addr(host, 1))) << host;
  }
  EXPECT_FALSE(p.IsLocal(Addr("192.0.2.1", 1)));
  EXPECT_FALSE(p.IsLocal(Addr("2001:db8::1", 1)));
  if (auto own = InterfaceAddress()) {
    EXPECT_TRUE(p.IsLocal(Addr(*own, 1))) << *own;
  }
}

TEST(BackendPolicyTest, ALocalBackendMustBeItsOwnersListener) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to own sockets as other users";
  // A socket's owner is a number: these uids need no entry in the password database, so no
  // user is created (the end-to-end tests use real ones).
  const std::optional<uid_t> alice = 64101;
  const std::optional<uid_t> bob = 64102;
  int fd = testing::ListenAs(*alice, "127.0.0.1", 0);
  ASSERT_GE(fd, 0);
  int port = testing::BoundPort(fd);
  BackendPolicy p;
  EXPECT_TRUE(p.CheckDial(Addr("127.0.0.1", port), *alice).ok());
  EXPECT_TRUE(p.CheckDial(Addr("::ffff:127.0.0.1", port), *alice).ok());
  Status s = p.CheckDial(Addr("127.0.0.1", port), *bob);
  EXPECT_EQ(s.code(), kDenied) << s.ToString();
  EXPECT_NE(s.message().find("belongs to uid " + std::to_string(*alice)), std::string::npos)
      << s.ToString();
  EXPECT_TRUE(p.CheckDial(Addr("127.0.0.1", port), 0).ok());  // root's jobs are exempt
  ::close(fd);
  EXPECT_EQ(p.CheckDial(Addr("127.0.0.1", port), *alice).code(), Status::Code::kNotFound);
  // Another host: no owner to check.
  EXPECT_TRUE(p.CheckDial(Addr("192.0.2.1", port), *bob).ok());
}

}  // namespace
}  // namespace brokerproxy::proxy
