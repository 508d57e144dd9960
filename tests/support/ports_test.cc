// The harness's ports (e2e/harness.h): a held port refuses connections and keeps other sockets
// off it until the test's own listener takes it over; StartOnFreePort retries a start that
// found its port taken, and only that.

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "e2e/harness.h"
#include "support/socket_as.h"

namespace brokerproxy::testing {
namespace {

// Binds a fresh socket to 127.0.0.1:`port`, with or without SO_REUSEADDR; the errno or 0.
int BindError(int port, bool reuse) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  if (reuse) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  int err = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 ? 0 : errno;
  if (err == 0 && ::listen(fd, 1) != 0) err = errno;
  ::close(fd);
  return err;
}

TEST(PortReservationTest, AHeldPortRefusesAndKeepsOthersOff) {
  PortReservation held;
  ASSERT_GT(held.port(), 0);
  EXPECT_LT(ConnectTcp(held.port(), "127.0.0.1", 1000), 0) << "nothing listens there";
  EXPECT_EQ(BindError(held.port(), /*reuse=*/false), EADDRINUSE);
  held.Release();
  EXPECT_EQ(BindError(held.port(), /*reuse=*/false), 0) << "released";
}

TEST(PortReservationTest, TheTestsOwnListenerTakesItOver) {
  PortReservation held;
  // Another listener of the test (SO_REUSEADDR, as ListenAs sets it) may listen there ...
  int other = ListenAs(0, "127.0.0.1", held.port());
  ASSERT_GE(other, 0);
  int fd = ConnectTcp(held.port(), "127.0.0.1", 1000);
  EXPECT_GE(fd, 0);
  if (fd >= 0) ::close(fd);
  ::close(other);
  // ... and once it closed, the port is still held and refuses again.
  EXPECT_LT(ConnectTcp(held.port(), "127.0.0.1", 1000), 0);
  // Or the held socket itself starts listening.
  int listener = held.Listen();
  ASSERT_GE(listener, 0);
  fd = ConnectTcp(BoundPort(listener), "127.0.0.1", 1000);
  EXPECT_GE(fd, 0);
  if (fd >= 0) ::close(fd);
  ::close(listener);
}

TEST(StartOnFreePortTest, APortTakenMeanwhileIsReplacedByAnother) {
  std::vector<int> tried;
  int port = 0;
  EXPECT_TRUE(StartOnFreePort(
      [&](int p, std::string*) {
        tried.push_back(p);
        return tried.size() < 3 ? PortStart::kInUse : PortStart::kStarted;
      },
      &port));
  ASSERT_EQ(tried.size(), 3u);
  EXPECT_EQ(port, tried.back());
  EXPECT_EQ(std::set<int>(tried.begin(), tried.end()).size(), 3u) << "a new port each time";
}

TEST(StartOnFreePortTest, GivesUpAfterItsAttemptsAndAtOnceOnAnotherFailure) {
  int calls = 0;
  int port = 0;
  ::testing::AssertionResult r = StartOnFreePort(
      [&](int, std::string* why) {
        ++calls;
        *why = "Address already in use";
        return PortStart::kInUse;
      },
      &port, /*attempts=*/4);
  EXPECT_FALSE(r);
  EXPECT_EQ(calls, 4);
  EXPECT_EQ(port, 0);
  calls = 0;
  r = StartOnFreePort(
      [&](int, std::string* why) {
        ++calls;
        *why = "bad config";
        return PortStart::kFailed;
      },
      &port);
  EXPECT_FALSE(r);
  EXPECT_EQ(calls, 1);
  EXPECT_NE(std::string(r.message()).find("bad config"), std::string::npos) << r.message();
}

// A real program that reports a taken port: socat, started on a port the test listens on.
TEST(StartOnFreePortTest, WaitListeningTellsAnAddressInUse) {
  if (::access("/usr/bin/socat", X_OK) != 0) GTEST_SKIP() << "socat is not installed";
  TempDir dir;
  PortReservation held;
  int busy = held.Listen();
  ASSERT_GE(busy, 0);
  int port = BoundPort(busy);
  auto child = Child::Spawn(
      {"socat", "TCP-LISTEN:" + std::to_string(port) + ",bind=127.0.0.1", "SYSTEM:cat"},
      dir / "socat.log");
  std::string why;
  EXPECT_EQ(WaitListening(&child, port, &why, 0, "never printed", 10000), PortStart::kInUse) << why;
  EXPECT_EQ(child, nullptr) << "stopped";
  ::close(busy);
}

}  // namespace
}  // namespace brokerproxy::testing
