// The owners of loopback listeners and connections, told by sock_diag (loop/sock_diag.h), with
// sockets owned by real other users (created with useradd): it needs root and changes the
// system's users, so it is an end-to-end suite, not a unit one.

#include "loop/sock_diag.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <optional>

#include "e2e/harness.h"
#include "loop/work.h"
#include "support/socket_as.h"

namespace brokerproxy::testing {
namespace {

// Closes an fd at scope exit.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

Result<uid_t> ListenerOwnerOf(const std::string& host, int port) {
  auto addr = loop::ParseNumericAddress(host, port);
  if (!addr) return Status::InvalidArgument("bad address " + host);
  return loop::TcpListenerOwner(reinterpret_cast<const sockaddr*>(&*addr));
}

class SockDiagTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to own sockets as other users";
    auto a = TestUser("bp-alice");
    auto b = TestUser("bp-bob");
    if (!a || !b) GTEST_SKIP() << "cannot create the test users";
    alice_ = *a;
    bob_ = *b;
  }
  uid_t alice_ = 0;
  uid_t bob_ = 0;
};

TEST_F(SockDiagTest, ListenerOnTheExactAddress) {
  Fd l(ListenAs(alice_, "127.0.0.1", 0));
  ASSERT_GE(l.fd, 0);
  int port = BoundPort(l.fd);
  auto owner = ListenerOwnerOf("127.0.0.1", port);
  ASSERT_TRUE(owner.ok()) << owner.status().ToString();
  EXPECT_EQ(*owner, alice_);
  // The same address as IPv4-mapped IPv6.
  owner = ListenerOwnerOf("::ffff:127.0.0.1", port);
  ASSERT_TRUE(owner.ok()) << owner.status().ToString();
  EXPECT_EQ(*owner, alice_);
  // Another loopback address on that port reaches nothing.
  EXPECT_EQ(ListenerOwnerOf("127.0.0.2", port).status().code(), Status::Code::kNotFound);
}

TEST_F(SockDiagTest, WildcardListenerTakesEveryAddressOfItsFamily) {
  Fd l(ListenAs(bob_, "0.0.0.0", 0));
  ASSERT_GE(l.fd, 0);
  int port = BoundPort(l.fd);
  for (const char* host : {"127.0.0.1", "127.0.0.2", "::ffff:127.0.0.1"}) {
    auto owner = ListenerOwnerOf(host, port);
    ASSERT_TRUE(owner.ok()) << host << ": " << owner.status().ToString();
    EXPECT_EQ(*owner, bob_) << host;
  }
}

TEST_F(SockDiagTest, DualStackIpv6WildcardTakesIpv4Too) {
  Fd l(ListenAs(bob_, "::", 0, /*v6only=*/false));
  if (l.fd < 0) GTEST_SKIP() << "no IPv6 here";
  int port = BoundPort(l.fd);
  for (const char* host : {"127.0.0.1", "::1"}) {
    auto owner = ListenerOwnerOf(host, port);
    ASSERT_TRUE(owner.ok()) << host << ": " << owner.status().ToString();
    EXPECT_EQ(*owner, bob_) << host;
  }
}

TEST_F(SockDiagTest, FamiliesAndV6OnlyAreToldApart) {
  // alice on 127.0.0.1:P (IPv4), bob on [::]:P with IPV6_V6ONLY: each answers for its family.
  Fd a(ListenAs(alice_, "127.0.0.1", 0));
  ASSERT_GE(a.fd, 0);
  int port = BoundPort(a.fd);
  Fd b(ListenAs(bob_, "::", port, /*v6only=*/true));
  if (b.fd < 0) GTEST_SKIP() << "no IPv6 here";
  auto v4 = ListenerOwnerOf("127.0.0.1", port);
  ASSERT_TRUE(v4.ok()) << v4.status().ToString();
  EXPECT_EQ(*v4, alice_);
  auto v6 = ListenerOwnerOf("::1", port);
  ASSERT_TRUE(v6.ok()) << v6.status().ToString();
  EXPECT_EQ(*v6, bob_);
  // The v6-only wildcard does not take 127.0.0.2.
  EXPECT_EQ(ListenerOwnerOf("127.0.0.2", port).status().code(), Status::Code::kNotFound);
}

TEST_F(SockDiagTest, ExactAddressWinsOverWildcardOfAnotherFamily) {
  // bob on 0.0.0.0:P, alice on [::1]:P: ::1 goes to alice, IPv4 to bob.
  Fd b(ListenAs(bob_, "0.0.0.0", 0));
  ASSERT_GE(b.fd, 0);
  int port = BoundPort(b.fd);
  Fd a(ListenAs(alice_, "::1", port, /*v6only=*/true));
  if (a.fd < 0) GTEST_SKIP() << "no IPv6 here";
  EXPECT_EQ(*ListenerOwnerOf("::1", port), alice_);
  EXPECT_EQ(*ListenerOwnerOf("127.0.0.1", port), bob_);
}

TEST_F(SockDiagTest, ConnectedSocketsOnThePortAreNotListeners) {
  Fd l(ListenAs(alice_, "127.0.0.1", 0));
  ASSERT_GE(l.fd, 0);
  int port = BoundPort(l.fd);
  Fd c(ConnectTcp(port));
  ASSERT_GE(c.fd, 0);
  Fd accepted(::accept(l.fd, nullptr, nullptr));
  ASSERT_GE(accepted.fd, 0);
  ::close(l.fd);  // the accepted connection on the port stays
  l.fd = -1;
  EXPECT_EQ(ListenerOwnerOf("127.0.0.1", port).status().code(), Status::Code::kNotFound);
}

TEST_F(SockDiagTest, NothingListening) {
  PortReservation idle;  // bound, not listening
  int port = idle.port();
  auto owner = ListenerOwnerOf("127.0.0.1", port);
  EXPECT_EQ(owner.status().code(), Status::Code::kNotFound) << owner.status().ToString();
  EXPECT_EQ(ListenerOwnerOf("127.0.0.1", 0).status().code(), Status::Code::kInvalidArgument);
}

// The owner of the client end of an accepted loopback connection.
std::optional<uid_t> PeerOwnerVia(uid_t client_uid, const char* host, Status* error) {
  Fd l(ListenAs(0, host, 0));
  if (l.fd < 0) return std::nullopt;
  auto addr = loop::ParseNumericAddress(host, BoundPort(l.fd));
  Fd c(SocketAs(client_uid, addr->ss_family));
  socklen_t alen = addr->ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  if (::connect(c.fd, reinterpret_cast<const sockaddr*>(&*addr), alen) != 0) return std::nullopt;
  Fd a(::accept(l.fd, nullptr, nullptr));
  sockaddr_storage self{}, peer{};
  socklen_t len = sizeof(self);
  ::getsockname(a.fd, reinterpret_cast<sockaddr*>(&self), &len);
  len = sizeof(peer);
  ::getpeername(a.fd, reinterpret_cast<sockaddr*>(&peer), &len);
  auto owner = loop::TcpPeerOwner(reinterpret_cast<const sockaddr*>(&peer),
                                  reinterpret_cast<const sockaddr*>(&self));
  if (!owner.ok()) {
    *error = owner.status();
    return std::nullopt;
  }
  return *owner;
}

TEST_F(SockDiagTest, PeerOwnerOfAnAcceptedLoopbackConnection) {
  Status error;
  EXPECT_EQ(PeerOwnerVia(alice_, "127.0.0.1", &error), alice_) << error.ToString();
  EXPECT_EQ(PeerOwnerVia(bob_, "127.0.0.1", &error), bob_) << error.ToString();
  EXPECT_EQ(PeerOwnerVia(0, "127.0.0.1", &error), 0u) << error.ToString();
  Fd probe(ListenAs(0, "::1", 0));
  if (probe.fd >= 0) {
    EXPECT_EQ(PeerOwnerVia(bob_, "::1", &error), bob_) << error.ToString();
  }
}

TEST_F(SockDiagTest, PeerOwnerOfAnUnknownTupleIsNotFound) {
  Fd l(ListenAs(alice_, "127.0.0.1", 0));
  ASSERT_GE(l.fd, 0);
  // The lookup would fall back to this listener; it must not be taken for the peer.
  auto local = loop::ParseNumericAddress("127.0.0.1", BoundPort(l.fd));
  PortReservation idle;
  auto remote = loop::ParseNumericAddress("127.0.0.1", idle.port());
  auto owner = loop::TcpPeerOwner(reinterpret_cast<const sockaddr*>(&*local),
                                  reinterpret_cast<const sockaddr*>(&*remote));
  EXPECT_EQ(owner.status().code(), Status::Code::kNotFound) << owner.status().ToString();
}

}  // namespace
}  // namespace brokerproxy::testing
