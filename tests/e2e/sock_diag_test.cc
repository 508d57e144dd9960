// The owners of loopback listeners and connections, told by sock_diag (loop/sock_diag.h), with
// sockets owned by real other users (created with useradd): it needs root and changes the
// system's users, so it is an end-to-end suite, not a unit one.

#include "loop/sock_diag.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <dirent.h>

#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>

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

// A client that closed its end leaves a remnant (TIME_WAIT, or FIN_WAIT2) that the kernel
// reports as uid 0's: a client that sends its bytes and closes at once must not pass for root
// (nor have its failures counted against root's).
TEST_F(SockDiagTest, PeerOwnerOfAClientThatClosedIsNotRoot) {
  Fd l(ListenAs(0, "127.0.0.1", 0));
  ASSERT_GE(l.fd, 0);
  auto addr = loop::ParseNumericAddress("127.0.0.1", BoundPort(l.fd));
  Fd c(SocketAs(alice_, AF_INET));
  ASSERT_GE(c.fd, 0);
  ASSERT_EQ(::connect(c.fd, reinterpret_cast<const sockaddr*>(&*addr), sizeof(sockaddr_in)), 0);
  Fd a(::accept(l.fd, nullptr, nullptr));
  ASSERT_GE(a.fd, 0);
  sockaddr_storage self{}, peer{};
  socklen_t len = sizeof(self);
  ASSERT_EQ(::getsockname(a.fd, reinterpret_cast<sockaddr*>(&self), &len), 0);
  len = sizeof(peer);
  ASSERT_EQ(::getpeername(a.fd, reinterpret_cast<sockaddr*>(&peer), &len), 0);
  auto lookup = [&] {
    return loop::TcpPeerOwner(reinterpret_cast<const sockaddr*>(&peer),
                              reinterpret_cast<const sockaddr*>(&self));
  };
  auto open = lookup();
  ASSERT_TRUE(open.ok()) << open.status().ToString();
  EXPECT_EQ(*open, alice_);
  ASSERT_TRUE(SendAll(c.fd, "BROKER1 job 00\n"));
  ::close(c.fd);
  c.fd = -1;
  char buf[64];
  ASSERT_GT(::recv(a.fd, buf, sizeof(buf), 0), 0);
  ASSERT_EQ(::recv(a.fd, buf, sizeof(buf), 0), 0);  // the FIN is here: the client closed
  // Closed but not gone (FIN_WAIT2): the socket itself, or already its remnant.
  auto closing = lookup();
  if (closing.ok()) {
    EXPECT_EQ(*closing, alice_);
  } else {
    EXPECT_EQ(closing.status().code(), Status::Code::kNotFound) << closing.status().ToString();
  }
  // Our FIN puts the client's end in TIME_WAIT: a remnant only, whose uid the kernel gives as 0.
  ASSERT_EQ(::shutdown(a.fd, SHUT_WR), 0);
  auto gone = lookup();
  EXPECT_EQ(gone.status().code(), Status::Code::kNotFound)
      << (gone.ok() ? "uid " + std::to_string(*gone) : gone.status().ToString());
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

// The inodes of this process's NETLINK_SOCK_DIAG sockets (/proc/net/netlink, protocol 4, among
// the inodes of /proc/self/fd).
std::set<std::string> SockDiagSockets() {
  std::set<std::string> mine;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (dirent* e = ::readdir(d)) {
      char target[64] = {};
      std::string path = std::string("/proc/self/fd/") + e->d_name;
      ssize_t n = ::readlink(path.c_str(), target, sizeof(target) - 1);
      std::string t(target, n > 0 ? static_cast<size_t>(n) : 0);
      if (t.rfind("socket:[", 0) == 0) mine.insert(t.substr(8, t.size() - 9));
    }
    ::closedir(d);
  }
  std::set<std::string> out;
  std::ifstream table("/proc/self/net/netlink");
  std::string line;
  std::getline(table, line);  // the header
  while (std::getline(table, line)) {
    // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
    std::istringstream in(line);
    std::string sk, eth, field, inode;
    in >> sk >> eth;
    for (int i = 0; i < 7; ++i) in >> field;
    in >> inode;
    if (eth == "4" && mine.count(inode)) out.insert(inode);
  }
  return out;
}

// A daemon asks at every connection: one socket per thread serves all its queries, and answers
// never cross between them (each query carries its own sequence number).
TEST_F(SockDiagTest, OneSocketPerThreadServesEveryQuery) {
  Fd l(ListenAs(alice_, "127.0.0.1", 0));
  ASSERT_GE(l.fd, 0);
  int port = BoundPort(l.fd);
  const std::set<std::string> before = SockDiagSockets();  // other threads' (this one's)
  auto thread_sockets = [&before] {
    std::set<std::string> out;
    for (const std::string& inode : SockDiagSockets()) {
      if (!before.count(inode)) out.insert(inode);
    }
    return out;
  };
  std::set<std::string> first;
  std::thread([&] {
    Status error;
    for (int i = 0; i < 20; ++i) {
      auto listener = ListenerOwnerOf("127.0.0.1", port);
      ASSERT_TRUE(listener.ok()) << listener.status().ToString();
      EXPECT_EQ(*listener, alice_);
      EXPECT_EQ(PeerOwnerVia(bob_, "127.0.0.1", &error), bob_) << error.ToString();
      PortReservation idle;
      EXPECT_EQ(ListenerOwnerOf("127.0.0.1", idle.port()).status().code(), Status::Code::kNotFound);
      std::set<std::string> now = thread_sockets();
      if (i == 0) first = now;
      EXPECT_EQ(now, first) << "query " << i << " used another socket";
    }
  }).join();
  EXPECT_EQ(first.size(), 1u) << "the thread's socket was not kept open";
  EXPECT_TRUE(thread_sockets().empty()) << "the thread's socket outlived it";
}

}  // namespace
}  // namespace brokerproxy::testing
